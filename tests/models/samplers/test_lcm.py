"""LCM against diffusers' LCMScheduler: plans and whole trajectories (with each image's own noise) bit
for bit (no UNet), the step limit, pictures at runs longer and shorter than the parity test's, on the
embedded model and on an LCM-distilled UNet (guidance as an embedding, no unconditional pass), rows
of different plans stepped together, and a failed step that changes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import models.pipeline as pipeline_module
from models.default_model import EMBEDDED_MODEL_DIR
from models.loading import load_model
from models.noise_schedule import NoiseSchedule
from models.pipeline import ActiveImage, Pipeline, generate
from models.random_model import random_weights, write_diffusers_folder
from models.samplers import get_sampler
from models.samplers.base import RowState
from models.stable_diffusion import StableDiffusion
from models.tiny_configs import TOKENIZER_PAD_TOKEN, tiny_config
from schemas.generation import Generation
from tests.support.diffusers_reference import diffusers_images, diffusers_scheduler, max_level_difference

PROMPT = "a red circle in the top left on a blue background"
NEGATIVE = "a green square"

SD1_SCHEDULE = tiny_config("sd1")["scheduler"]
EMBEDDED_SCHEDULE = json.loads((EMBEDDED_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": SD1_SCHEDULE,
    "embedded": EMBEDDED_SCHEDULE,  # zero terminal SNR (alpha_bar 0 at t=999), v-prediction
    "clipped-x0": {**SD1_SCHEDULE, "clip_sample": True, "clip_sample_range": 0.5},
    "distilled-on-8": {**SD1_SCHEDULE, "original_inference_steps": 8, "timestep_scaling": 5.0},
    "sample-prediction": {**SD1_SCHEDULE, "prediction_type": "sample", "beta_schedule": "linear"},
}


def fake_model(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet that depends on the sample and the timestep."""
    return torch.tanh(sample * 0.7 + float(timestep) / 500.0) * 0.9


def run_ours(config: dict[str, Any], request: Generation, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Our sampler on `fake_model` from `x` (one row per image), noise from one generator per image."""
    schedule = NoiseSchedule.from_config(config)
    sampler = get_sampler("lcm")
    plan = sampler.plan(schedule, request)
    rows = [RowState(plan) for _ in range(len(x))]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(x))]

    def noise(marks: Any) -> torch.Tensor:
        shape = (1, *x.shape[1:])
        return torch.cat(
            [
                torch.randn(shape, generator=g) if mark else torch.zeros(shape)
                for g, mark in zip(generators, marks, strict=True)
            ]
        )

    while not rows[0].done:
        result = sampler.step(schedule, fake_model(x, plan.timesteps[rows[0].step_index]), x, rows, noise)
        x, rows = result.samples, result.states
    return x


def run_diffusers(scheduler: Any, x: torch.Tensor, seed: int) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(x))]
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t), t, x, generator=generators).prev_sample
    return x


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_plans_and_steps_equal_diffusers_bit_for_bit(config_name: str) -> None:
    """Timesteps and whole trajectories (2 rows, each with its own generator) equal diffusers'."""
    config = CONFIGS[config_name]
    for scheduler in ("normal", "sgm_uniform"):
        for steps in (1, 2, 4, 8, 15):
            if steps > config.get("original_inference_steps", 50):
                continue
            request = Generation(prompt="x", steps=steps, sampler="lcm", scheduler=scheduler)
            reference = diffusers_scheduler(config, "lcm", scheduler)
            reference.set_timesteps(steps)
            plan = get_sampler("lcm").plan(NoiseSchedule.from_config(config), request)
            case = f"{config_name} {scheduler} {steps} steps"
            assert plan.timesteps.tolist() == reference.timesteps.float().tolist(), case
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
            expected = run_diffusers(reference, x, seed=5)
            assert expected.isfinite().all(), case
            torch.testing.assert_close(
                run_ours(config, request, x, seed=5), expected, rtol=0, atol=0, msg=case
            )


def test_timesteps_skip_through_the_distillation_schedule() -> None:
    """50 distillation timesteps 999, 979, ..., 19; 4 steps take every 12th and a half; sgm_uniform
    (trailing) changes nothing: LCMScheduler does not read timestep_spacing."""
    schedule = NoiseSchedule.from_config(SD1_SCHEDULE)
    for scheduler in ("normal", "sgm_uniform"):
        plan = get_sampler("lcm").plan(schedule, Generation(prompt="x", steps=4, scheduler=scheduler))
        assert plan.timesteps.tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize(("config_name", "limit"), [("sd1", 50), ("distilled-on-8", 8)])
def test_more_steps_than_the_distillation_schedule_are_refused(config_name: str, limit: int) -> None:
    """diffusers refuses them too (its timesteps are a subset of original_inference_steps)."""
    config = CONFIGS[config_name]
    reference = diffusers_scheduler(config, "lcm", "normal")
    reference.set_timesteps(limit)  # the limit itself is allowed
    with pytest.raises(ValueError):
        reference.set_timesteps(limit + 1)
    request = Generation(prompt="x", steps=limit + 1, sampler="lcm")
    with pytest.raises(ValueError, match=f"1 to {limit} steps .* got {limit + 1}"):
        get_sampler("lcm").plan(NoiseSchedule.from_config(config), request)


@pytest.fixture(scope="module")
def sd1(random_models: dict[str, Path]) -> StableDiffusion:
    return load_model(random_models["sd1"])


@pytest.mark.parametrize(("steps", "num_images"), [(15, 1), (2, 2)])
def test_random_model_picture_equals_diffusers(
    steps: int, num_images: int, sd1: StableDiffusion, random_models: dict[str, Path]
) -> None:
    """More steps than LCM's usual 2-8, and fewer; classifier-free guidance on an undistilled UNet."""
    request = Generation(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=steps, guidance_scale=3.0,
        sampler="lcm", seed=11, num_images=num_images,
    )  # fmt: skip
    expected = diffusers_images(random_models["sd1"], request)
    got = np.stack(generate(sd1, request))
    assert got.shape == expected.shape == (num_images, 64, 64, 3)
    assert max_level_difference(got, expected) <= 2
    assert got.std() > 10


def test_embedded_model_picture_equals_diffusers() -> None:
    """Zero terminal SNR: LCM's first step is at alpha_bar 0 (v-prediction: x0 = -v there)."""
    request = Generation(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=4, sampler="lcm", seed=3,
        num_images=2,
    )  # fmt: skip
    expected = diffusers_images(EMBEDDED_MODEL_DIR, request)
    got = np.stack(generate(load_model(EMBEDDED_MODEL_DIR), request))
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert max_level_difference(got, expected) <= 2
    assert got.std() > 10


GUIDANCE_DIM = 32  # SimianLuo/LCM_Dreamshaper_v7 has 256


@pytest.fixture(scope="module")
def distilled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.x model whose UNet takes a guidance embedding (time_cond_proj_dim), as an
    LCM-distilled UNet does, written as a diffusers folder."""
    configs = tiny_config("sd1")
    configs["unet"]["time_cond_proj_dim"] = GUIDANCE_DIM
    weights = random_weights(configs, seed=3)
    assert weights["unet"]["time_embedding.cond_proj.weight"].shape[1] == GUIDANCE_DIM
    folder = tmp_path_factory.mktemp("lcm-distilled") / "model"
    return write_diffusers_folder(folder, configs, weights, TOKENIZER_PAD_TOKEN["sd1"])


@pytest.mark.parametrize(
    ("sampler", "guidance_scale", "steps"), [("lcm", 8.0, 4), ("lcm", 1.0, 1), ("uni_pc", 2.0, 5)]
)
def test_distilled_unet_picture_equals_diffusers(
    sampler: str, guidance_scale: float, steps: int, distilled_folder: Path
) -> None:
    """The guidance scale enters as an embedding of w - 1 (any sampler), with one UNet row per image:
    diffusers' pipeline then runs no classifier-free guidance, whatever the scale."""
    request = Generation(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=steps,
        guidance_scale=guidance_scale, sampler=sampler, seed=7, num_images=2,
    )  # fmt: skip
    model = load_model(distilled_folder)
    (images,) = Pipeline(model).start([(0, request)])
    assert all(image.uncond is None and image.rows == 1 for image in images)
    expected = diffusers_images(distilled_folder, request)
    got = np.stack(generate(model, request))
    assert max_level_difference(got, expected) <= 2
    assert got.std() > 10


def test_distilled_unet_pictures_depend_on_the_guidance(distilled_folder: Path) -> None:
    model = load_model(distilled_folder)
    low, high = (
        generate(
            model, Generation(prompt=PROMPT, width=64, height=64, steps=2, guidance_scale=g, sampler="lcm")
        )
        for g in (1.5, 8.0)
    )
    assert max_level_difference(low[0], high[0]) > 10


BATCH = {
    "four": Generation(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=4,
                       guidance_scale=2.0, sampler="lcm", seed=1),
    "six": Generation(prompt="a blue square", width=64, height=64, steps=6, guidance_scale=1.0,
                      sampler="lcm", scheduler="sgm_uniform", seed=2, num_images=2),
    "ddim": Generation(prompt="a triangle", width=64, height=64, steps=5, eta=0.5,
                       sampler="ddim", scheduler="sgm_uniform", seed=3),
}  # fmt: skip


def run_to_the_end(pipeline: Pipeline, images: list[ActiveImage]) -> None:
    while active := [image for image in images if not image.done]:
        pipeline.step(active)


def test_rows_of_different_plans_step_together_as_alone(sd1: StableDiffusion) -> None:
    """Different step counts, guidance and samplers in one call, joining at different steps, some rows
    at their last step (no noise) beside others drawing theirs: every picture is the one it gets alone."""
    alone = {key: generate(sd1, request) for key, request in BATCH.items()}
    pipeline = Pipeline(sd1)
    (first,) = pipeline.start([("four", BATCH["four"])])
    pipeline.step(first)
    later = pipeline.start([("six", BATCH["six"]), ("ddim", BATCH["ddim"])])
    images = first + [image for group in later for image in group]
    run_to_the_end(pipeline, images)
    for key in BATCH:
        mine = [image for image in images if image.key == key]
        for a, b in zip(alone[key], pipeline.decode(mine), strict=True):
            assert max_level_difference(a, b) <= 1, key
    for image in images:
        if image.sampler.name == "lcm":  # the last step gives the consistency estimate itself
            assert torch.equal(image.latent, image.denoised)


def test_failed_step_changes_nothing(sd1: StableDiffusion, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that raises after the UNet call and after the LCM rows' noise was drawn leaves every
    state, latent and generator as it was: retried, the run ends as one that never failed."""
    requests = [("uni_pc", Generation(prompt="a square", width=64, height=64, steps=5, sampler="uni_pc")),
                ("six", BATCH["six"])]  # fmt: skip
    reference_pipeline = Pipeline(sd1)
    reference = [image for group in reference_pipeline.start(requests) for image in group]
    run_to_the_end(reference_pipeline, reference)

    pipeline = Pipeline(sd1)
    images = [image for group in pipeline.start(requests) for image in group]
    pipeline.step(images)
    pipeline.step(images)
    before = [(i.state, i.latent.clone(), i.denoised.clone(), i.generator.get_state()) for i in images]
    real_source = pipeline_module._noise_source

    def failing_source(rows: Any, device: torch.device) -> Any:
        draw = real_source(rows, device)

        def draw_then_fail(marks: Any) -> torch.Tensor:
            draw(marks)  # the generators have advanced
            raise RuntimeError("out of memory (simulated)")

        return draw_then_fail

    monkeypatch.setattr(pipeline_module, "_noise_source", failing_source)
    with pytest.raises(RuntimeError, match="simulated"):
        pipeline.step(images)  # the UniPC group stepped; the LCM group failed after drawing its noise
    for image, (state, latent, denoised, generator_state) in zip(images, before, strict=True):
        assert image.state is state and image.step_index == 2
        assert torch.equal(image.latent, latent) and torch.equal(image.denoised, denoised)
        assert torch.equal(image.generator.get_state(), generator_state)

    monkeypatch.setattr(pipeline_module, "_noise_source", real_source)
    run_to_the_end(pipeline, images)
    for image, expected in zip(images, reference, strict=True):
        assert torch.equal(image.latent, expected.latent)
