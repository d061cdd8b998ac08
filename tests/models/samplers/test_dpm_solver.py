"""DPM-Solver++ 2M and its SDE variant against diffusers' DPMSolverMultistepScheduler: plans and steps
bit for bit on many scheduler configs (no UNet), whole pictures at runs longer and shorter than the
parity test's and on the embedded model, and rows of different plans stepped together."""

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
from models.samplers import get_sampler
from models.samplers.base import RowState
from models.stable_diffusion import StableDiffusion
from schemas.generation import Generation
from tests.support.diffusers_reference import diffusers_images, diffusers_scheduler, max_level_difference

PROMPT = "a red circle in the top left on a blue background"
NEGATIVE = "a green square"

SD1_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# scheduler configs that reach every option the plan reads
CONFIGS: dict[str, dict[str, Any]] = {
    "sd1-leading": SD1_SCHEDULE,
    "linspace-default": {k: v for k, v in SD1_SCHEDULE.items() if k != "timestep_spacing"},
    "embedded": json.loads((EMBEDDED_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text()),
    "heun": {**SD1_SCHEDULE, "solver_type": "heun", "prediction_type": "v_prediction"},
    # second order at the last step in runs of 15 or more; first order below 15
    "sigma-min": {**SD1_SCHEDULE, "final_sigmas_type": "sigma_min"},
    "sigma-min-no-lower-final": {**SD1_SCHEDULE, "final_sigmas_type": "sigma_min", "lower_order_final": False},
    "euler-at-final": {**SD1_SCHEDULE, "final_sigmas_type": "sigma_min", "euler_at_final": True},
    # lambda_min_clipped cuts the range: trailing then gives fewer timesteps than asked
    "cosine-clipped": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"},
    "sample-prediction": {**SD1_SCHEDULE, "prediction_type": "sample"},
}  # fmt: skip
SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde")
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform")


def fake_model(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet that depends on the sample and the timestep."""
    return torch.tanh(sample * 0.7 + float(timestep) / 500.0) * 0.9


def generators(count: int, seed: int = 5) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def run_ours(config: dict[str, Any], request: Generation, x: torch.Tensor,
             generators: list[torch.Generator]) -> torch.Tensor:  # fmt: skip
    """Our sampler on `fake_model` from `x` (one row per image), noise from each row's generator."""
    schedule = NoiseSchedule.from_config(config)
    sampler = get_sampler(request.sampler)
    plan = sampler.plan(schedule, request)
    rows = [RowState(plan) for _ in range(len(x))]
    shape = (1, *x.shape[1:])

    def noise(marks: Any) -> torch.Tensor:  # every row draws: the SDE sampler marks them all
        assert all(marks)
        return torch.cat([torch.randn(shape, generator=g) for g in generators])

    while not rows[0].done:
        result = sampler.step(schedule, fake_model(x, plan.timesteps[rows[0].step_index]), x, rows, noise)
        x, rows = result.samples, result.states
    return x


def run_diffusers(scheduler: Any, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t), t, x, generator=generators).prev_sample
    return x


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_plans_and_steps_equal_diffusers_bit_for_bit(config_name: str) -> None:
    """Timesteps, sigmas and whole trajectories (2 rows, per-row noise) equal diffusers' exactly."""
    config = CONFIGS[config_name]
    checked = 0
    for sampler in SAMPLERS:
        for scheduler in SCHEDULERS:
            for steps in (1, 3, 14, 15, 20):
                request = Generation(prompt="x", steps=steps, sampler=sampler, scheduler=scheduler)
                reference = diffusers_scheduler(config, sampler, scheduler)
                reference.set_timesteps(steps)
                plan = get_sampler(sampler).plan(NoiseSchedule.from_config(config), request)
                case = f"{sampler} {scheduler} {steps} steps"
                torch.testing.assert_close(
                    plan.timesteps, reference.timesteps.float(), rtol=0, atol=0, msg=case
                )
                torch.testing.assert_close(plan.sigmas, reference.sigmas, rtol=0, atol=0, msg=case)
                if steps > 1 and reference.timesteps[0] == reference.timesteps[1]:
                    continue  # diffusers fails there (see test_duplicated_first_timestep_...)
                x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
                theirs, mine = generators(2), generators(2)
                expected = run_diffusers(reference, x, theirs)
                got = run_ours(config, request, x, mine)
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=case)
                # the same number of draws (the SDE's last one changes no picture, only the stream)
                for a, b in zip(mine, theirs, strict=True):
                    assert torch.equal(a.get_state(), b.get_state()), case
                checked += 1
    assert checked >= len(SAMPLERS) * len(SCHEDULERS) * 2  # most cases ran, not only plans


def test_orders_follow_diffusers_lower_order_rules() -> None:
    """First step first order; the last one too with final sigma zero, or below 15 steps."""
    orders = {}
    for name in ("sd1-leading", "sigma-min"):
        for steps in (14, 15):
            plan = get_sampler("dpmpp_2m").plan(
                NoiseSchedule.from_config(CONFIGS[name]), Generation(prompt="x", steps=steps)
            )
            orders[name, steps] = plan.orders.tolist()
    assert orders["sd1-leading", 15] == [1] + [2] * 13 + [1]
    assert orders["sigma-min", 14] == [1] + [2] * 12 + [1]
    assert orders["sigma-min", 15] == [1] + [2] * 14


def test_duplicated_first_timestep_runs_from_the_start() -> None:
    """Zero terminal SNR + karras at 50 steps plans timesteps 999, 999, 999, ...: diffusers starts at
    index 1 and fails at its last step; we run every step and end on the x0 estimate."""
    config = CONFIGS["embedded"]
    request = Generation(prompt="x", steps=50, sampler="dpmpp_2m", scheduler="karras")
    reference = diffusers_scheduler(config, "dpmpp_2m", "karras")
    reference.set_timesteps(50)
    assert reference.timesteps[0] == reference.timesteps[1] == 999
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(IndexError):
        run_diffusers(reference, x, generators(1))
    assert run_ours(config, request, x, generators(1)).isfinite().all()


@pytest.fixture(scope="module")
def sd1(random_models: dict[str, Path]) -> StableDiffusion:
    return load_model(random_models["sd1"])


@pytest.mark.parametrize(
    ("sampler", "scheduler", "steps", "num_images"),
    [
        ("dpmpp_2m", "karras", 20, 1),  # no lower-order final step at 20 steps
        ("dpmpp_2m_sde", "normal", 20, 2),
        ("dpmpp_2m", "sgm_uniform", 3, 2),
        ("dpmpp_2m_sde", "exponential", 3, 2),
    ],
)
def test_random_model_picture_equals_diffusers(
    sampler: str,
    scheduler: str,
    steps: int,
    num_images: int,
    sd1: StableDiffusion,
    random_models: dict[str, Path],
) -> None:
    request = Generation(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=64,
        height=64,
        steps=steps,
        guidance_scale=6.0,
        sampler=sampler,
        scheduler=scheduler,
        seed=11,
        num_images=num_images,
    )
    expected = diffusers_images(random_models["sd1"], request)
    got = np.stack(generate(sd1, request))
    assert got.shape == expected.shape == (num_images, 64, 64, 3)
    assert max_level_difference(got, expected) <= 2
    assert got.std() > 10


def test_embedded_model_picture_equals_diffusers() -> None:
    """Zero terminal SNR (first sigma 4096), v-prediction, trailing spacing. (Its karras and exponential
    plans, with their duplicated rounded timesteps, are checked above without the UNet.)"""
    request = Generation(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=64,
        height=64,
        steps=8,
        sampler="dpmpp_2m_sde",
        seed=3,
        num_images=2,
    )
    expected = diffusers_images(EMBEDDED_MODEL_DIR, request)
    got = np.stack(generate(load_model(EMBEDDED_MODEL_DIR), request))
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert max_level_difference(got, expected) <= 2
    assert got.std() > 10


BATCH = {
    "2m": Generation(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=6,
                     sampler="dpmpp_2m", scheduler="karras", seed=1),
    "sde": Generation(prompt="a blue square", width=64, height=64, steps=4, guidance_scale=1.0,
                      sampler="dpmpp_2m_sde", scheduler="normal", seed=2, num_images=2),
    "ddim": Generation(prompt="a triangle", width=64, height=64, steps=5, eta=0.5,
                       sampler="ddim", scheduler="sgm_uniform", seed=3),
}  # fmt: skip


def run_to_the_end(pipeline: Pipeline, images: list[ActiveImage]) -> None:
    while active := [image for image in images if not image.done]:
        pipeline.step(active)


def test_rows_of_different_plans_step_together_as_alone(sd1: StableDiffusion) -> None:
    """Different step counts, schedules, guidance and samplers in one call, joining at different
    steps: every request's picture is the one it gets alone, and both samplers end on x0."""
    alone = {key: generate(sd1, request) for key, request in BATCH.items()}
    pipeline = Pipeline(sd1)
    (first,) = pipeline.start([("2m", BATCH["2m"])])
    pipeline.step(first)
    pipeline.step(first)  # the 2M image is at step 2 with a history when the others join
    later = pipeline.start([("sde", BATCH["sde"]), ("ddim", BATCH["ddim"])])
    images = first + [image for group in later for image in group]
    run_to_the_end(pipeline, images)
    for key in BATCH:
        mine = [image for image in images if image.key == key]
        for a, b in zip(alone[key], pipeline.decode(mine), strict=True):
            assert max_level_difference(a, b) <= 1, key
    for image in images:
        if image.sampler.name != "ddim":  # final sigma 0: the last step gives x0 itself
            assert torch.equal(image.latent, image.denoised)


def test_failed_step_changes_nothing(sd1: StableDiffusion, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that raises after the UNet call and after some rows' noise was drawn leaves every state,
    latent and generator as it was: retried, the run ends as one that never failed."""
    requests = [("2m", BATCH["2m"]), ("sde", BATCH["sde"])]
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
        pipeline.step(images)  # the 2M group stepped; the SDE group failed after drawing its noise
    for image, (state, latent, denoised, generator_state) in zip(images, before, strict=True):
        assert image.state is state and image.step_index == 2 and len(image.state.history) == 1
        assert torch.equal(image.latent, latent) and torch.equal(image.denoised, denoised)
        assert torch.equal(image.generator.get_state(), generator_state)

    monkeypatch.setattr(pipeline_module, "_noise_source", real_source)
    run_to_the_end(pipeline, images)
    for image, expected in zip(images, reference, strict=True):
        assert torch.equal(image.latent, expected.latent)
