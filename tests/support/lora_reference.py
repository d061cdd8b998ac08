"""diffusers with LoRAs as the numerical reference: its pipeline on the same folder with
`load_lora_weights` per file and `set_adapters(names, weights)` (unfused: diffusers' PEFT layers add
scale x B(A(x)) beside each base layer), then the LoRAs unloaded again."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from schemas.generation import Generation
from tests.support.diffusers_reference import _pipeline, diffusers_images


def diffusers_lora_images(
    folder: Path, request: Generation, loras: Sequence[tuple[Path, float]]
) -> np.ndarray:
    """(num_images, H, W, 3) uint8: diffusers' picture of `request` (its `loras` field ignored: the
    LoRAs are `loras`, (PEFT-format file, weight) each)."""
    pipe, _ = _pipeline(str(folder))
    names = [f"lora{i}" for i in range(len(loras))]
    try:
        for name, (path, _) in zip(names, loras, strict=True):
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
        return diffusers_images(folder, request)
    finally:
        pipe.unload_lora_weights()
