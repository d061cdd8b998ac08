"""The training script runs end to end on the tiny architecture and writes a loadable model folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.loading import load_model
from models.pipeline import generate
from schemas.generation import Generation
from training import train
from training.diffusion import timestep_weights
from training.schedule import warmup_cosine


def test_training_runs_end_to_end_on_a_tiny_config(tmp_path: Path) -> None:
    out = tmp_path / "model"
    code = train.main(
        [
            "--out", str(out), "--architecture", "tiny", "--seed", "3",
            "--vae-steps", "2", "--vae-batch", "2",
            "--unet-steps", "2", "--unet-batch", "4", "--pool-size", "8",
        ]
    )  # fmt: skip
    assert code == 0
    for name in ("model_index.json", "defaults.json", "training_summary.json", "tokenizer/vocab.json"):
        assert (out / name).is_file(), name
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] > 0 and vae_config["scaling_factor"] != 1.0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["diffusion"]["steps"] == 2 and np.isfinite(summary["diffusion"]["final_loss"])

    model = load_model(out)
    assert model.native_size == (64, 64)
    assert model.vae_scale_factor == 4
    (image,) = generate(
        model,
        Generation(
            prompt="a red circle in the top left on a blue background", width=64, height=64, steps=2, seed=1
        ),
    )
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_weights_are_stored_in_float16(tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "model"
    train.main(["--out", str(out), "--architecture", "tiny", "--vae-steps", "1", "--vae-batch", "2",
                "--unet-steps", "1", "--unet-batch", "2", "--pool-size", "4"])  # fmt: skip
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118


def test_schedules() -> None:
    assert warmup_cosine(0, 100, 10) == 0.1
    assert warmup_cosine(10, 100, 10) == 1.0
    assert abs(warmup_cosine(100, 100, 10) - 0.05) < 1e-9
    alphas = torch.linspace(0.999, 0.0, 1000)  # ends at zero SNR
    weights = timestep_weights(alphas, gamma=5.0)
    assert weights[-1] == 1.0 and weights[500] == 1.0  # pure noise and SNR ~1: full weight
    assert abs(weights[0] - 5.0 / 999.0) < 1e-3  # nearly clean: capped at gamma / SNR


def test_attribute_heads_read_every_attribute_of_kept_captions() -> None:
    """The text encoder's auxiliary loss: trained alone on fixed features it learns the four
    attributes; rows whose caption was dropped ("") add nothing."""
    from training.diffusion import AttributeHeads
    from training.shapes import random_scene

    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(64)]
    # features that hold the attributes (one-hot, concatenated): a linear head can read them
    features = torch.cat(
        [
            torch.nn.functional.one_hot(
                torch.tensor([names.index(getattr(s, attribute)) for s in scenes]), len(names)
            ).float()
            for attribute, names in AttributeHeads.ATTRIBUTES
        ],
        dim=1,
    )
    torch.manual_seed(0)
    heads = AttributeHeads(features.shape[1])
    before = heads.loss(features, scenes).item()
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        heads.loss(features, scenes).backward()
        optimizer.step()
    assert before > 1.0 and heads.loss(features, scenes).item() < 0.05
    assert heads.loss(features[:2], [None, None]).item() == 0.0
    # a dropped caption's row does not count: garbage features there change nothing
    mixed = torch.cat([features[:4], torch.randn(1, features.shape[1]) * 100])
    assert heads.loss(mixed, [*scenes[:4], None]).item() == heads.loss(features[:4], scenes[:4]).item()
