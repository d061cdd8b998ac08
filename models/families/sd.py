"""SD 1.x and 2.x: one CLIP text encoder (SD 2.x: OpenCLIP ViT-H in the HF layout), whose last hidden
state (SD 2.x: of a 23-layer tower, the penultimate of OpenCLIP's 24) is the context; no other
per-row input."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.families import Conditioning
from models.stable_diffusion import StableDiffusion
from models.text import PromptEncoder
from schemas.generation import SDXL_FIELDS, Generation


class SDPromptEncoder:
    """models.text.PromptEncoder's contexts, as Conditioning."""

    def __init__(self, model: StableDiffusion, max_text_batch: int) -> None:
        self.encoder = PromptEncoder(model.tokenizer, model.text_encoder, max_text_batch)

    def encode_pairs(
        self, prompts: Sequence[str], negative_prompts: Sequence[str | None]
    ) -> list[tuple[Conditioning, Conditioning | None]]:
        return [
            (Conditioning(cond), None if uncond is None else Conditioning(uncond))
            for cond, uncond in self.encoder.encode_pairs(prompts, negative_prompts)
        ]


class StableDiffusionFamily:
    name = "sd"
    label = "SD 1.x/2.x"

    def prompt_encoder(self, model: StableDiffusion, max_text_batch: int) -> SDPromptEncoder:
        return SDPromptEncoder(model, max_text_batch)

    def request_row_inputs(self, model: StableDiffusion, request: Generation) -> dict[str, torch.Tensor]:
        return {}

    def check_generation(self, model: StableDiffusion, request: Generation) -> None:
        for name in SDXL_FIELDS:
            if getattr(request, name) is not None:
                raise ValueError(
                    f"{name} is an SDXL size condition; this model is {self.label} and takes none "
                    "(leave it out or null)"
                )


SD = StableDiffusionFamily()
