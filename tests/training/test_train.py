"""The training script runs end to end on the tiny architecture and writes a loadable model folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models.loading import load_model
from models.pipeline import generate
from schemas.generation import Generation
from training import train
from training.captions import vocabulary
from training.diffusion import timestep_weights
from training.schedule import warmup_cosine


def test_training_runs_end_to_end_on_a_tiny_config(tmp_path: Path) -> None:
    out = tmp_path / "model"
    code = train.main(
        [
            "--out", str(out), "--architecture", "tiny", "--seed", "3",
            "--vae-steps", "2", "--vae-batch", "2",
            "--unet-steps", "2", "--unet-batch", "4", "--pool-size", "8", "--text-pretrain-steps", "2",
        ]
    )  # fmt: skip
    assert code == 0
    for name in ("model_index.json", "defaults.json", "training_summary.json", "tokenizer/vocab.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "vocabulary.json").read_text()) == vocabulary()
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] > 0 and vae_config["scaling_factor"] != 1.0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["diffusion"]["text_pretrain_steps"] == 2
    assert summary["diffusion"]["steps"] == 2 and np.isfinite(summary["diffusion"]["final_loss"])
    assert summary["seconds"]["total"] >= 0 and summary["seconds"]["cpu_total"] >= 0

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
                "--unet-steps", "1", "--unet-batch", "2", "--pool-size", "4", "--text-pretrain-steps", "0"])  # fmt: skip
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
    # a caption that leaves the background out: its row does not count for the background head
    wrong = [replace(scenes[0], background=scenes[1].background), *scenes[1:4]]
    named = [False, True, True, True]
    assert heads.loss(features[:4], wrong, named).item() == heads.loss(features[:4], scenes[:4], named).item()
    assert heads.loss(features[:4], wrong).item() > heads.loss(features[:4], scenes[:4]).item()


def test_text_pretraining_teaches_the_text_encoder_the_attributes_of_free_phrasings() -> None:
    """Before the UNet joins, the text encoder alone learns to tell a caption's colour, shape,
    position and background apart, whatever order the words come in."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.loading import TOKENIZER_ASSETS, load_tokenizer
    from training.architecture import architecture
    from training.diffusion import AttributeHeads, CaptionTokens, DiffusionRecipe, pretrain_text_encoder
    from training.shapes import random_scene

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(architecture("tiny")["text_encoder"]))
    heads = AttributeHeads(text_encoder.config.hidden_size)
    tokens = CaptionTokens(load_tokenizer(TOKENIZER_ASSETS), text_encoder)
    scenes = [random_scene(rng) for _ in range(256)]
    # a higher learning rate than the real recipe's, to learn in 300 steps (10 s)
    recipe = DiffusionRecipe(
        text_pretrain_steps=300, text_pretrain_batch=32, log_every=10, warmup_steps=10, text_lr_scale=10
    )
    final = pretrain_text_encoder(text_encoder, heads, tokens, scenes, recipe, rng)
    # chance is ~1.9 (ln 8 for the colours, ln 9 for the position, ln 3 for the shape, averaged)
    assert final < 0.6, final

    # held-out captions of the same scenes: every attribute read right from the pooled state
    from training.captions import describe

    with torch.no_grad():
        described = [describe(scene, rng, names_background=True) for scene in scenes[:64]]
        pooled = text_encoder(input_ids=tokens([d.text for d in described])).pooler_output
        for head, (attribute, names) in zip(heads.heads, AttributeHeads.ATTRIBUTES, strict=True):
            predicted = head(pooled).argmax(dim=1).tolist()
            right = sum(names[p] == getattr(s, attribute) for p, s in zip(predicted, scenes, strict=False))
            assert right / 64 > 0.6, (attribute, right)  # chance: 12.5% (colours), 11%, 33%


def test_ema_follows_the_ramped_decay() -> None:
    from training.schedule import EMA

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    ema = EMA(module, decay=0.9)
    start = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)  # decay min(0.9, 2 / 11): moves 9/11 of the way
    assert torch.allclose(ema.module.weight, start + 9 / 11, atol=1e-6)
    for _ in range(50):
        ema.update(module)
    assert torch.allclose(ema.module.weight, module.weight, atol=1e-3)
    assert not ema.module.weight.requires_grad
