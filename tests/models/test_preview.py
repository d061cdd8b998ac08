"""models/preview.py: the latent -> RGB maps of live previews, fixed and fitted to a model's VAE, and
what a preview shows on the embedded model: the sampler's estimate of the final picture."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.default_model import EMBEDDED_MODEL_DIR
from models.loading import load_model
from models.pipeline import Pipeline
from models.preview import SD_LATENT_RGB_FACTORS, fit_rgb_map, generic_factors, latent_to_rgb, rgb_map
from models.stable_diffusion import StableDiffusion
from schemas.generation import Generation
from schemas.samplers import SAMPLERS

# one generation: (noisy latent, estimate of the clean latent) after each step, its final latent and
# its final picture averaged over each latent cell
Run = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]

PROMPTS = (
    "a red circle in the top left on a blue background",
    "a green square in the center on a white background",
    "yellow triangle bottom right, black background",
    "a purple circle on the left on an orange background",
)


def test_shape_dtype_and_device() -> None:
    latent = torch.randn(1, 4, 8, 12)
    image = latent_to_rgb(latent)
    assert image.shape == (8, 12, 3) and image.dtype == torch.uint8 and image.device.type == "cpu"
    assert torch.equal(image, latent_to_rgb(latent[0]))  # (C, h, w) too


def test_sd_factors_map_each_channel_to_its_colour() -> None:
    for channel, factors in enumerate(SD_LATENT_RGB_FACTORS):
        latent = torch.zeros(4, 1, 1)
        latent[channel] = 1.0
        expected = [round((f + 1) / 2 * 255) for f in factors]
        assert latent_to_rgb(latent)[0, 0].tolist() == expected
    assert latent_to_rgb(torch.zeros(4, 2, 2)).unique().tolist() == [128]  # zero latent: mid grey


def test_out_of_range_values_are_clipped() -> None:
    latent = torch.zeros(4, 1, 2)
    latent[3, 0, 0], latent[3, 0, 1] = 10.0, -10.0  # channel 4 pulls every colour strongly
    assert latent_to_rgb(latent)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize("channels", [1, 3, 8, 16])
def test_other_channel_counts_use_the_generic_map(channels: int) -> None:
    factors = generic_factors(channels)
    assert factors.shape == (channels, 3)
    assert torch.allclose(factors.sum(dim=0)[: min(channels, 3)], torch.ones(min(channels, 3)))
    image = latent_to_rgb(torch.linspace(-3, 3, channels * 16).reshape(channels, 4, 4))
    assert image.shape == (4, 4, 3)
    assert image.min() == 0 and image.max() == 255  # stretched to the full range
    flat = latent_to_rgb(torch.full((channels, 2, 2), 5.0))
    assert (flat == flat[0, 0]).all()  # a flat latent gives a flat picture (no NaN, no noise blown up)


def test_rejects_batches_and_wrong_ranks() -> None:
    with pytest.raises(ValueError, match="batch of 2"):
        latent_to_rgb(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        latent_to_rgb(torch.zeros(4, 8))


def test_a_map_must_fit_the_channels() -> None:
    with pytest.raises(ValueError, match=r"needs a \(5, 3\) map"):
        latent_to_rgb(torch.zeros(4, 2, 2), torch.zeros(4, 3))
    bias_only = torch.zeros(5, 3)
    bias_only[-1] = torch.tensor([1.0, -1.0, 0.0])  # the last row is the bias
    colours = latent_to_rgb(torch.randn(4, 2, 2), bias_only).reshape(-1, 3).unique(dim=0)
    assert colours.tolist() == [[255, 0, 128]]


# --- on the embedded model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> StableDiffusion:
    torch.set_num_threads(1)  # as the workers run; a shared machine's thread pool only slows it
    return load_model(EMBEDDED_MODEL_DIR)


@pytest.fixture(scope="module")
def runs(embedded: StableDiffusion) -> list[Run]:
    """For each prompt, run together: (noisy latent, estimate of the clean one) after each of 20 steps,
    the final latent, and the final picture averaged over each latent cell ((h, w, 3), 0..255)."""
    pipeline = Pipeline(embedded)
    requests = [
        (i, Generation(prompt=p, width=64, height=64, steps=20, guidance_scale=5.0, seed=10 + i))
        for i, p in enumerate(PROMPTS)
    ]
    images = [group[0] for group in pipeline.start(requests)]
    steps: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in images]
    while not images[0].done:
        pipeline.step(images)
        for history, image in zip(steps, images, strict=True):
            assert image.denoised is not None
            history.append((image.latent.clone(), image.denoised.clone()))
    f = embedded.vae_scale_factor
    pictures = torch.from_numpy(np.stack(pipeline.decode(images))).float().permute(0, 3, 1, 2)  # (N, 3, H, W)
    cells = F.avg_pool2d(pictures, f).permute(0, 2, 3, 1)  # (N, h, w, 3)
    return [(history, image.latent, cell) for history, image, cell in zip(steps, images, cells, strict=True)]


def error(preview: torch.Tensor, target: torch.Tensor) -> float:
    """Mean absolute error of a (h, w, 3) uint8 preview against a picture's cells, on 0..255."""
    return (preview.float() - target).abs().mean().item()


def test_the_fit_is_cheap_and_kept_on_the_model(embedded: StableDiffusion) -> None:
    started = time.perf_counter()
    weights = fit_rgb_map(embedded)
    assert time.perf_counter() - started < 1.0  # CPU, tiny VAE
    assert weights.shape == (embedded.latent_channels + 1, 3) and weights.isfinite().all()
    assert torch.allclose(weights, fit_rgb_map(embedded), atol=1e-5)  # a function of the model alone
    kept = rgb_map(embedded)
    assert rgb_map(embedded) is kept is embedded.preview_rgb_map


def test_the_fitted_map_reproduces_decodes_better_than_the_fixed_one(embedded: StableDiffusion, runs) -> None:
    """Held-out latents: the final latents of generations (the fit saw only synthetic pictures)."""
    weights = rgb_map(embedded)
    fixed = sum(error(latent_to_rgb(final), cells) for _, final, cells in runs) / len(runs)
    fitted = sum(error(latent_to_rgb(final, weights), cells) for _, final, cells in runs) / len(runs)
    # measured: fixed SD factors 60, fitted 40 (this small VAE's colours are not quite linear per cell)
    assert fitted < 0.8 * fixed, (fitted, fixed)


def test_a_preview_midway_looks_like_the_final_picture(embedded: StableDiffusion, runs) -> None:
    """Step 10 of 20: the estimate of the clean latent through the fitted map is much closer to the
    picture the job ends with than the noisy latent through the fixed map (the previews before)."""
    weights = rgb_map(embedded)
    old = sum(error(latent_to_rgb(history[9][0]), cells) for history, _, cells in runs) / len(runs)
    new = sum(error(latent_to_rgb(history[9][1], weights), cells) for history, _, cells in runs) / len(runs)
    # measured: old 75, new 43 (of 255)
    assert new < 0.75 * old, (new, old)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_gives_an_estimate_of_the_clean_latent(embedded: StableDiffusion, sampler: str) -> None:
    pipeline = Pipeline(embedded)
    request = Generation(prompt=PROMPTS[0], width=64, height=64, steps=4, seed=1, sampler=sampler)
    (images,) = pipeline.start([(0, request)])
    assert images[0].denoised is None  # nothing estimated before the first step
    pipeline.step(images)
    estimate = images[0].denoised
    assert estimate is not None and estimate.shape == images[0].latent.shape and estimate.isfinite().all()
