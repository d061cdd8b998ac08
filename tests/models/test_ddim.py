"""DDIM against diffusers' DDIMScheduler: timesteps, schedule, and the per-row update."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from models.pipeline import guided_noise
from models.samplers.ddim import DDIMSchedule, ddim_step
from models.tiny_configs import tiny_config

SD_SCHEDULER = tiny_config("sd1")["scheduler"]


def test_fifty_leading_steps_are_981_to_1() -> None:
    schedule = DDIMSchedule.from_config(SD_SCHEDULER)
    assert schedule.timesteps(50).tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 333, 1000])
def test_timesteps_match_diffusers(spacing: str, steps: int) -> None:
    config = {**SD_SCHEDULER, "timestep_spacing": spacing}
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(steps)
    ours = DDIMSchedule.from_config(config)
    if int(reference.timesteps.max()) >= 1000:  # diffusers would index past alphas_cumprod; we refuse
        with pytest.raises(ValueError, match="steps must be between"):
            ours.timesteps(steps)
        return
    assert ours.timesteps(steps).tolist() == reference.timesteps.tolist()


@pytest.mark.parametrize(
    "config",
    [
        SD_SCHEDULER,
        {"beta_schedule": "linear"},  # diffusers' defaults everywhere else (clip_sample, set_alpha_to_one)
        {**SD_SCHEDULER, "beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True},
    ],
)
def test_schedule_matches_diffusers(config: dict) -> None:
    reference = DDIMScheduler.from_config(config)
    ours = DDIMSchedule.from_config(config)
    torch.testing.assert_close(ours.alphas_cumprod, reference.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(ours.final_alpha_cumprod, reference.final_alpha_cumprod, rtol=0, atol=0)
    assert ours.clip_sample == reference.config.clip_sample


def test_last_step_uses_alphas_cumprod_0_without_set_alpha_to_one() -> None:
    schedule = DDIMSchedule.from_config({**SD_SCHEDULER, "set_alpha_to_one": False})
    assert schedule.final_alpha_cumprod == schedule.alphas_cumprod[0]
    # epsilon prediction of exactly zero noise: x_prev = sqrt(a_prev / a_t) * x
    sample = torch.ones(1, 1, 2, 2)
    t = torch.tensor([1])
    out = ddim_step(schedule, torch.zeros_like(sample), sample, t, torch.tensor([50]), torch.tensor([0.0]))
    expected = (schedule.alphas_cumprod[0] / schedule.alphas_cumprod[1]) ** 0.5
    torch.testing.assert_close(out, sample * expected)
    one = DDIMSchedule.from_config({**SD_SCHEDULER, "set_alpha_to_one": True})
    out = ddim_step(one, torch.zeros_like(sample), sample, t, torch.tensor([50]), torch.tensor([0.0]))
    torch.testing.assert_close(out, sample / one.alphas_cumprod[1] ** 0.5)


# the embedded model's schedule: zero terminal SNR (alpha_bar = 0 at t = 999), v-prediction, trailing
ZERO_SNR = {"rescale_betas_zero_snr": True, "set_alpha_to_one": True, "steps_offset": 0}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_batched_rows_equal_diffusers_row_by_row(prediction_type: str, spacing: str, zero_snr: bool) -> None:
    """Rows at different timesteps, step counts and etas, in one call, equal diffusers per row."""
    config = {**SD_SCHEDULER, "prediction_type": prediction_type, "timestep_spacing": spacing}
    if zero_snr:
        config.update(ZERO_SNR)
    schedule = DDIMSchedule.from_config(config)
    gen = torch.Generator().manual_seed(0)
    # (steps, index, eta); index 0 of trailing spacing is t = 999
    rows = [(50, 0, 0.0), (50, 49, 0.0), (20, 7, 0.5), (3, 2, 1.0), (1000, 500, 0.3), (20, 0, 0.5)]
    sample = torch.randn(len(rows), 4, 3, 5, generator=gen)
    model_output = torch.randn(len(rows), 4, 3, 5, generator=gen)
    noise = torch.randn(len(rows), 4, 3, 5, generator=gen)

    timesteps, expected = [], []
    for i, (steps, index, eta) in enumerate(rows):
        reference = DDIMScheduler.from_config(config)
        reference.set_timesteps(steps)
        t = reference.timesteps[index]
        timesteps.append(int(t))
        kwargs = {"variance_noise": noise[i : i + 1]} if eta > 0 else {}
        out = reference.step(model_output[i : i + 1], t, sample[i : i + 1], eta=eta, **kwargs).prev_sample
        expected.append(out)

    ours = ddim_step(
        schedule,
        model_output,
        sample,
        torch.tensor(timesteps),
        torch.tensor([r[0] for r in rows]),
        torch.tensor([r[2] for r in rows]),
        noise,
    )
    torch.testing.assert_close(ours, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_guidance_is_per_row() -> None:
    cond = torch.full((3, 1, 1, 1), 2.0)
    uncond = torch.full((3, 1, 1, 1), 1.0)
    out = guided_noise(cond, uncond, torch.tensor([1.0, 7.5, 0.0]))
    assert out.flatten().tolist() == [2.0, 8.5, 1.0]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"thresholding": True}, "thresholding"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ],
)
def test_bad_scheduler_config_is_named(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DDIMSchedule.from_config({**SD_SCHEDULER, **config})


@pytest.mark.parametrize("steps", [0, 1000, 1001])
def test_steps_out_of_range(steps: int) -> None:
    """Leading spacing with steps_offset 1 cannot take 1000 steps: it would need timestep 1000."""
    with pytest.raises(ValueError, match="steps must be between 1 and 999"):
        DDIMSchedule.from_config(SD_SCHEDULER).timesteps(steps)


@pytest.mark.parametrize(("spacing", "max_steps"), [("leading", 999), ("trailing", 1000), ("linspace", 1000)])
def test_max_steps_is_the_most_that_exists(spacing: str, max_steps: int) -> None:
    schedule = DDIMSchedule.from_config({**SD_SCHEDULER, "timestep_spacing": spacing})
    assert schedule.max_steps == max_steps
    assert int(schedule.timesteps(max_steps).max()) < 1000
