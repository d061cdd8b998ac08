"""Whole pipeline against diffusers: same PNG for the same seed, batch independence, both formats."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from models.loading import load_model
from models.noise_schedule import NoiseSchedule
from models.pipeline import Pipeline, check_generation, generate
from models.stable_diffusion import StableDiffusion
from schemas.generation import Generation

PROMPT = "a red circle in the top left on a blue background"
NEGATIVE = "a green square"


@pytest.fixture(scope="module")
def ours(random_models: dict[str, Path]) -> dict[str, StableDiffusion]:
    return {variant: load_model(random_models[variant]) for variant in ("sd1", "sd2")}


def diffusers_images(folder: Path, request: Generation) -> np.ndarray:
    """diffusers' StableDiffusionPipeline + DDIMScheduler with a list of CPU generators."""
    pipe = StableDiffusionPipeline.from_pretrained(
        folder,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32,  # the embedded model is stored in float16
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        request.prompt,
        negative_prompt=request.negative_prompt or None,
        width=request.width,
        height=request.height,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        eta=request.eta,
        num_images_per_prompt=request.num_images,
        generator=[torch.Generator("cpu").manual_seed(s) for s in request.image_seeds()],
    )
    return np.stack([np.asarray(image) for image in result.images])


# 100 training steps with leading spacing and steps_offset 1: at most 99 inference steps
SHORT_SCHEDULE = {"num_train_timesteps": 100, "steps_offset": 1}


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_png_pixels_equal_diffusers(
    variant: str, eta: float, ours: dict[str, StableDiffusion], random_models: dict[str, Path]
) -> None:
    request = Generation(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=80,
        height=48,
        steps=8,
        eta=eta,
        seed=1234,
        num_images=2,
    )
    expected = diffusers_images(random_models[variant], request)
    got = np.stack(generate(ours[variant], request))
    assert got.shape == expected.shape == (2, 48, 80, 3)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()} levels"
    assert got.std() > 10  # a real picture, not a flat image that would match anything


def test_without_guidance_equals_diffusers(
    ours: dict[str, StableDiffusion], random_models: dict[str, Path]
) -> None:
    request = Generation(prompt=PROMPT, width=64, height=64, steps=5, guidance_scale=1.0, seed=7)
    expected = diffusers_images(random_models["sd1"], request)
    got = np.stack(generate(ours["sd1"], request))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def test_embedded_model_equals_diffusers() -> None:
    """The embedded model's schedule (zero terminal SNR, v-prediction, trailing) in both pipelines."""
    from models.default_model import EMBEDDED_MODEL_DIR

    request = Generation(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=20, eta=0.5, seed=3, num_images=2
    )
    expected = diffusers_images(EMBEDDED_MODEL_DIR, request)
    got = np.stack(generate(load_model(EMBEDDED_MODEL_DIR), request))
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2
    assert got.std() > 10


def test_request_alone_equals_request_in_a_batch(ours: dict[str, StableDiffusion]) -> None:
    """Other seeds, step counts, guidance, eta, sizes and prompt lengths beside it change nothing."""
    model = ours["sd1"]
    target = Generation(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=6, eta=0.5, seed=99, num_images=2
    )
    alone = generate(model, target)

    others = [
        Generation(prompt="a blue square", width=64, height=64, steps=9, guidance_scale=3.0, seed=5),
        Generation(prompt=" ".join(["cat"] * 90), width=64, height=64, steps=4, guidance_scale=1.0, seed=6),
        Generation(prompt="a triangle", width=64, height=64, steps=6, eta=1.0, seed=8, num_images=3),
    ]
    sampler = Pipeline(model)
    started = sampler.start([("other0", others[0]), ("target", target)])
    running = [image for images in started for image in images]
    late = sampler.start([("other1", others[1]), ("other2", others[2])])
    for step in range(12):
        if step == 2:  # requests join between steps
            running += [image for images in late for image in images]
        active = [image for image in running if not image.done]
        if not active:
            break
        sampler.step(active)
    target_images = [image for image in running if image.key == "target"]
    assert all(image.done for image in target_images)
    batched = sampler.decode(target_images)
    for a, b in zip(alone, batched, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_single_file_equals_folder(
    variant: str, random_models: dict[str, Path], ours: dict[str, StableDiffusion]
) -> None:
    from_file = load_model(random_models[f"{variant}_file"], config=random_models[variant])
    folder = ours[variant]
    request = Generation(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=48, steps=3, seed=3)
    latents = []
    for model in (folder, from_file):
        sampler = Pipeline(model)
        (images,) = sampler.start([(0, request)])
        while not images[0].done:
            sampler.step(images)
        latents.append(images[0].latent)
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=1e-5)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folder.vae.encode(x)[0], from_file.vae.encode(x)[0], rtol=0, atol=1e-5)


def test_long_prompt_uses_all_chunks(ours: dict[str, StableDiffusion]) -> None:
    """Tokens past 77 change the picture (A1111 chunking, not diffusers' truncation)."""
    model = ours["sd1"]
    base = " ".join(["a red circle"] * 30)  # 90 tokens
    a = generate(model, Generation(prompt=base + " dog", width=64, height=64, steps=3, seed=1))[0]
    b = generate(model, Generation(prompt=base + " cat", width=64, height=64, steps=3, seed=1))[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompt_token_limit(field: str, ours: dict[str, StableDiffusion]) -> None:
    fits = Generation(**{"prompt": "x", field: " ".join(["cat"] * 600)})
    check_generation(ours["sd1"], fits)
    too_long = Generation(**{"prompt": "x", field: " ".join(["cat"] * 601)})
    with pytest.raises(ValueError, match=f"{field} is 601 CLIP tokens long; at most 600"):
        check_generation(ours["sd1"], too_long)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("width", 60, "width\n.*multiple of 8"),
        ("height", 0, "height\n.*greater than or equal to 8"),
        ("steps", 1000, "steps\n.*less than or equal to 150"),
        ("eta", 1.5, "eta\n.*less than or equal to 1"),
        ("num_images", 0, "num_images\n.*greater than or equal to 1"),
        ("seed", -1, "seed\n.*greater than or equal to 0"),
    ],
)
def test_bad_request_names_the_field(field: str, value: object, message: str) -> None:
    """Bounds every model shares are refused when the description is built, naming field and bound."""
    with pytest.raises(ValueError, match=message):
        Generation(**{"prompt": "x", "width": 64, "height": 64, field: value})


def test_model_limits_name_the_field(ours: dict[str, StableDiffusion]) -> None:
    """What depends on the model (its schedule's longest run) is checked against the loaded model."""
    model = ours["sd1"]
    short = replace(model, schedule=NoiseSchedule.from_config({**SHORT_SCHEDULE}))
    with pytest.raises(ValueError, match="steps must be between 1 and 99 for this model, got 120"):
        check_generation(short, Generation(prompt="x", width=64, height=64, steps=120))
