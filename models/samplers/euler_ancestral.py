"""Euler ancestral ("Euler a"), as diffusers' `EulerAncestralDiscreteScheduler`: an Euler step down to
sigma_down, then fresh noise of size sigma_up from the image's own generator, so that the marginal
noise level is sigma_next (Karras et al. 2022 / k-diffusion's `sample_euler_ancestral`, eta 1).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    at_step,
    per_row,
)
from models.samplers.euler import predicted_original, scale_for_unet, sigma_add_noise, sigma_plan
from schemas.generation import Generation


class EulerAncestral(Sampler):
    name = "euler_ancestral"

    def plan(self, schedule: NoiseSchedule, generation: Generation) -> SigmaPlan:
        return sigma_plan(schedule, generation)  # diffusers offers no other sigma schedule here

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
        sigma_to = per_row(at_step(rows, "sigmas", 1), samples)
        denoised = predicted_original(schedule.prediction_type, model_output, samples, sigma)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (samples - denoised) / sigma
        updated = samples + derivative * (sigma_down - sigma)
        # diffusers draws this noise at every step, the last one included (where sigma_up is 0)
        updated = updated + noise([True] * len(rows)) * sigma_up
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
