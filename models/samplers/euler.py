"""Euler (Karras et al. 2022, Algorithm 2 without churn) on the sigma scale, as diffusers'
`EulerDiscreteScheduler`: x_{i+1} = x_i + (x_i - x0_i) / sigma_i * (sigma_{i+1} - sigma_i).

The latent lives on the sigma scale (x = x0 + sigma * noise); the UNet sees x / sqrt(sigma^2 + 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.noise_schedule import NoiseSchedule
from models.samplers.base import (
    NoiseSource,
    Plan,
    RowState,
    Sampler,
    SigmaPlan,
    StepResult,
    advanced,
    at_levels,
    at_step,
    exponential_sigmas,
    first_step,
    karras_sigmas,
    per_row,
    sigma_to_t,
    spaced_timesteps,
)
from schemas.generation import Generation

# diffusers' EulerDiscreteScheduler defaults for the options a scheduler config may leave out
SPACING_DEFAULT = "linspace"
STEPS_OFFSET_DEFAULT = 0


def training_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sqrt((1 - alpha_bar) / alpha_bar) of every training timestep, float32, as diffusers' Euler
    schedulers compute it. Zero terminal SNR would make the last one infinite: they set alpha_bar
    there to 2**-24 (float16's smallest subnormal), and so do we."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    if schedule.option("rescale_betas_zero_snr", False):
        alphas_cumprod[-1] = 2**-24
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def spacing_of(schedule: NoiseSchedule, scheduler: str) -> str:
    return "trailing" if scheduler == "sgm_uniform" else schedule.option("timestep_spacing", SPACING_DEFAULT)


def sigma_plan(schedule: NoiseSchedule, generation: Generation) -> SigmaPlan:
    """EulerDiscreteScheduler.set_timesteps for the request's steps and scheduler (interpolation
    "linear", final sigma zero), and its init_noise_sigma."""
    steps = generation.steps
    spacing = spacing_of(schedule, generation.scheduler)
    timesteps = spaced_timesteps(
        spacing,
        schedule.num_train_timesteps,
        steps,
        schedule.option("steps_offset", STEPS_OFFSET_DEFAULT),
    )
    all_sigmas = training_sigmas(schedule)
    log_sigmas = np.log(all_sigmas)
    sigmas = np.interp(timesteps, np.arange(0, len(all_sigmas)), all_sigmas)
    if generation.scheduler == "karras":
        sigmas = karras_sigmas(sigmas, steps)
        timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
    elif generation.scheduler == "exponential":
        sigmas = exponential_sigmas(sigmas, steps)
        timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    max_sigma = sigmas.max()
    # diffusers: the initial noise of "leading" spacing is sqrt(max_sigma^2 + 1), not max_sigma
    init = max_sigma if spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
    return SigmaPlan(
        timesteps=torch.from_numpy(timesteps.astype(np.float32)),
        init_noise_sigma=float(init),
        sigmas=sigmas,
        start=first_step(generation, len(timesteps)),
    )


def sigma_add_noise(original: torch.Tensor, noise: torch.Tensor, plans: Sequence[Plan],
                    levels: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """The Euler schedulers' `add_noise`: x0 + noise * sigma, at each row's sigma."""
    return original + noise * per_row(at_levels(plans, "sigmas", levels), original)


def predicted_original(
    prediction_type: str, model_output: torch.Tensor, samples: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """x0 from the model's output on the sigma scale (epsilon or v-prediction), per row."""
    if prediction_type == "epsilon":
        return samples - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (samples / (sigma**2 + 1))
    raise ValueError(f"the Euler samplers need epsilon or v_prediction, not {prediction_type}")


def scale_for_unet(samples: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """x / sqrt(sigma^2 + 1): the UNet was trained on unit-variance inputs."""
    sigma = per_row(at_step(rows, "sigmas"), samples)
    return samples / ((sigma**2 + 1) ** 0.5)


class Euler(Sampler):
    name = "euler"

    def plan(self, schedule: NoiseSchedule, generation: Generation) -> SigmaPlan:
        return sigma_plan(schedule, generation)

    def scale_input(self, samples: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
        return scale_for_unet(samples, rows)

    def step(
        self,
        schedule: NoiseSchedule,
        model_output: torch.Tensor,
        samples: torch.Tensor,
        rows: Sequence[RowState],
        noise: NoiseSource,
    ) -> StepResult:
        sigma = per_row(at_step(rows, "sigmas"), samples)
        sigma_next = per_row(at_step(rows, "sigmas", 1), samples)
        denoised = predicted_original(schedule.prediction_type, model_output, samples, sigma)
        derivative = (samples - denoised) / sigma
        updated = samples + derivative * (sigma_next - sigma)
        return StepResult(samples=updated, states=advanced(rows), denoised=denoised)

    def add_noise(
        self,
        schedule: NoiseSchedule,
        original: torch.Tensor,
        noise: torch.Tensor,
        plans: Sequence[Plan],
        levels: Sequence[int],
    ) -> torch.Tensor:
        return sigma_add_noise(original, noise, plans, levels)
