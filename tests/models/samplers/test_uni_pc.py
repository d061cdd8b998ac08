"""UniPC against diffusers' UniPCMultistepScheduler: plans and whole trajectories bit for bit on many
scheduler configs (no UNet), pictures at runs longer and shorter than the parity test's and on the
embedded model, rows of different plans stepped together, and a failed step that changes nothing."""

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
from models.tiny_configs import tiny_config
from schemas.generation import Generation
from tests.support.diffusers_reference import diffusers_images, diffusers_scheduler, max_level_difference

PROMPT = "a red circle in the top left on a blue background"
NEGATIVE = "a green square"

SD1_SCHEDULE = tiny_config("sd1")["scheduler"]  # leading spacing, steps_offset 1
EMBEDDED_SCHEDULE = json.loads((EMBEDDED_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
# scheduler configs that reach every option the plan reads
CONFIGS: dict[str, dict[str, Any]] = {
    "sd1-leading": SD1_SCHEDULE,
    "linspace-default": {k: v for k, v in SD1_SCHEDULE.items() if k != "timestep_spacing"},
    "embedded": EMBEDDED_SCHEDULE,  # zero terminal SNR, v-prediction, trailing
    "order-3": {**SD1_SCHEDULE, "solver_order": 3, "prediction_type": "sample"},
    "order-1": {**SD1_SCHEDULE, "solver_order": 1},
    "epsilon-space": {**SD1_SCHEDULE, "predict_x0": False, "final_sigmas_type": "sigma_min"},
    "bh1-sigma-min": {**SD1_SCHEDULE, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "no-corrector-at-1-3": {**SD1_SCHEDULE, "disable_corrector": [1, 3]},
    "no-lower-final": {**SD1_SCHEDULE, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
}
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform")


def fake_model(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet that depends on the sample and the timestep."""
    return torch.tanh(sample * 0.7 + float(timestep) / 500.0) * 0.9


def run_ours(config: dict[str, Any], request: Generation, x: torch.Tensor) -> torch.Tensor:
    schedule = NoiseSchedule.from_config(config)
    sampler = get_sampler("uni_pc")
    plan = sampler.plan(schedule, request)
    rows = [RowState(plan) for _ in range(len(x))]
    while not rows[0].done:
        timestep = plan.timesteps[rows[0].step_index]
        output = fake_model(x, timestep)
        result = sampler.step(schedule, output, x, rows, noise=None)  # type: ignore[arg-type]  # draws none
        x, rows = result.samples, result.states
    return x


def run_diffusers(scheduler: Any, x: torch.Tensor) -> torch.Tensor:
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_plans_and_steps_equal_diffusers(config_name: str) -> None:
    """Timesteps and sigmas equal diffusers' exactly, whole trajectories (2 rows) to float32 rounding:
    the same arithmetic, but which vector kernels (AVX2, AVX-512, with or without fused multiply-adds)
    torch picks depends on the CPU, so the last bit may differ from one machine to another."""
    config = CONFIGS[config_name]
    for scheduler in SCHEDULERS:
        for steps in (1, 2, 3, 8, 15):
            request = Generation(prompt="x", steps=steps, sampler="uni_pc", scheduler=scheduler)
            reference = diffusers_scheduler(config, "uni_pc", scheduler)
            reference.set_timesteps(steps)
            plan = get_sampler("uni_pc").plan(NoiseSchedule.from_config(config), request)
            case = f"{config_name} {scheduler} {steps} steps"
            torch.testing.assert_close(plan.timesteps, reference.timesteps.float(), rtol=0, atol=0, msg=case)
            torch.testing.assert_close(plan.sigmas, reference.sigmas, rtol=0, atol=0, msg=case)
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
            expected = run_diffusers(reference, x)
            assert expected.isfinite().all(), case
            torch.testing.assert_close(run_ours(config, request, x), expected, rtol=1e-6, atol=1e-6, msg=case)


def test_orders_and_corrector_follow_diffusers_rules() -> None:
    """Warm-up from order 1, lower orders at the end whatever the step count, and the corrector at
    every step but the first and those after a step listed in disable_corrector."""
    schedule = NoiseSchedule.from_config(CONFIGS["no-corrector-at-1-3"])
    plan = get_sampler("uni_pc").plan(schedule, Generation(prompt="x", steps=20, sampler="uni_pc"))
    assert plan.orders == (1,) + (2,) * 18 + (1,)
    assert plan.corrects == (False, True, False, True, False) + (True,) * 15
    order_3 = NoiseSchedule.from_config(CONFIGS["order-3"])
    plan = get_sampler("uni_pc").plan(order_3, Generation(prompt="x", steps=6, sampler="uni_pc"))
    assert plan.orders == (1, 2, 3, 3, 2, 1)


@pytest.mark.parametrize(
    "options", [{"solver_type": "bh1"}, {"predict_x0": False}, {"lower_order_final": False}]
)
def test_options_that_give_nan_in_diffusers_are_refused(options: dict[str, Any]) -> None:
    """A last step to sigma 0 with these options divides by log(0) in diffusers: NaN pictures there,
    a ValueError naming the options here."""
    config = {**SD1_SCHEDULE, **options}
    reference = diffusers_scheduler(config, "uni_pc", "normal")
    reference.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not run_diffusers(reference, x).isfinite().all()
    request = Generation(prompt="x", steps=5, sampler="uni_pc")
    with pytest.raises(ValueError, match=f"{next(iter(options))}={next(iter(options.values()))}"):
        get_sampler("uni_pc").plan(NoiseSchedule.from_config(config), request)


def test_plans_are_shared_per_schedule_and_request() -> None:
    sampler = get_sampler("uni_pc")
    schedule = NoiseSchedule.from_config(SD1_SCHEDULE)
    request = Generation(prompt="x", steps=9, sampler="uni_pc", scheduler="karras")
    plan = sampler.plan(schedule, request)
    assert sampler.plan(schedule, request.model_copy(update={"prompt": "y"})) is plan
    assert sampler.plan(NoiseSchedule.from_config(SD1_SCHEDULE), request) is not plan
    assert sampler.plan(schedule, request.model_copy(update={"steps": 8})).steps == 8


@pytest.fixture(scope="module")
def sd1(random_models: dict[str, Path]) -> StableDiffusion:
    return load_model(random_models["sd1"])


@pytest.mark.parametrize(
    ("scheduler", "steps", "num_images"), [("karras", 15, 1), ("normal", 2, 2), ("sgm_uniform", 3, 1)]
)
def test_random_model_picture_equals_diffusers(
    scheduler: str, steps: int, num_images: int, sd1: StableDiffusion, random_models: dict[str, Path]
) -> None:
    request = Generation(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=64,
        height=64,
        steps=steps,
        guidance_scale=6.0,
        sampler="uni_pc",
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
    """Zero terminal SNR (first sigma 4096), v-prediction, trailing spacing."""
    request = Generation(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=10, sampler="uni_pc", seed=3,
        num_images=2,
    )  # fmt: skip
    expected = diffusers_images(EMBEDDED_MODEL_DIR, request)
    got = np.stack(generate(load_model(EMBEDDED_MODEL_DIR), request))
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert max_level_difference(got, expected) <= 2
    assert got.std() > 10


BATCH = {
    "karras": Generation(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=7,
                         sampler="uni_pc", scheduler="karras", seed=1),
    "sgm": Generation(prompt="a blue square", width=64, height=64, steps=4, guidance_scale=1.0,
                      sampler="uni_pc", scheduler="sgm_uniform", seed=2, num_images=2),
    "ddim": Generation(prompt="a triangle", width=64, height=64, steps=5, eta=0.5,
                       sampler="ddim", seed=3),
}  # fmt: skip


def run_to_the_end(pipeline: Pipeline, images: list[ActiveImage]) -> None:
    while active := [image for image in images if not image.done]:
        pipeline.step(active)


def test_rows_of_different_plans_step_together_as_alone(sd1: StableDiffusion) -> None:
    """Different step counts, schedules, orders, corrector states and samplers in one call, joining at
    different steps: every request's picture is the one it gets alone."""
    alone = {key: generate(sd1, request) for key, request in BATCH.items()}
    pipeline = Pipeline(sd1)
    (first,) = pipeline.start([("karras", BATCH["karras"])])
    pipeline.step(first)
    pipeline.step(first)  # at step 2 with a history and a last sample when the others join
    later = pipeline.start([("sgm", BATCH["sgm"]), ("ddim", BATCH["ddim"])])
    images = first + [image for group in later for image in group]
    run_to_the_end(pipeline, images)
    for key in BATCH:
        mine = [image for image in images if image.key == key]
        for a, b in zip(alone[key], pipeline.decode(mine), strict=True):
            assert max_level_difference(a, b) <= 1, key
    for image in images:
        if image.sampler.name == "uni_pc":  # final sigma 0: the last step gives x0 itself
            assert torch.equal(image.latent, image.denoised)
            assert len(image.state.history) == 2 and image.state.last_sample is not None


def test_failed_step_changes_nothing(sd1: StableDiffusion, monkeypatch: pytest.MonkeyPatch) -> None:
    """The UniPC group steps, then a batch-mate's noise draw fails: every state (history, last
    sample), latent and generator is as it was, and the retried run ends as one that never failed."""
    ancestral = Generation(
        prompt="a triangle", width=64, height=64, steps=4, sampler="euler_ancestral", seed=4
    )
    requests = [("karras", BATCH["karras"]), ("ancestral", ancestral)]
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
        pipeline.step(images)
    for image, (state, latent, denoised, generator_state) in zip(images, before, strict=True):
        assert image.state is state and image.step_index == 2
        assert torch.equal(image.latent, latent) and torch.equal(image.denoised, denoised)
        assert torch.equal(image.generator.get_state(), generator_state)
    assert len(images[0].state.history) == 2 and images[0].state.last_sample is not None

    monkeypatch.setattr(pipeline_module, "_noise_source", real_source)
    run_to_the_end(pipeline, images)
    for image, expected in zip(images, reference, strict=True):
        assert torch.equal(image.latent, expected.latent)
