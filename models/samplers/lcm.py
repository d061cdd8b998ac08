"""Latent Consistency Models (Luo et al. 2023, https://arxiv.org/abs/2310.04378) as diffusers'
`LCMScheduler`: each step maps the noisy latent straight to a clean estimate with the consistency
function f(x, t) = c_skip(t) * x + c_out(t) * x0(x, t), then noises it again to the next timestep
with fresh noise from the image's own generator (the paper's multistep consistency sampling).

The timesteps are a subset of the `original_inference_steps` (50) evenly spaced timesteps the model
was distilled on: 999, 979, ..., 19 for 1000 training steps, of which `steps` are taken at evenly
spaced indices. More steps than `original_inference_steps` are refused, as diffusers refuses them.

diffusers' behaviours copied on purpose:
- `timestep_spacing` is not read: "sgm_uniform" (trailing) gives the same plan as "normal".
- the last step returns the clean estimate itself and draws no noise; every other step draws
  (1, C, h, w) standard normal noise from the image's generator.
- c_skip and c_out use the integer timestep times `timestep_scaling` (10) with sigma_data 0.5, in
  float32.
- zero terminal SNR keeps alpha_bar = 0 at the last training timestep (no 2**-24 as UniPC and the
  Euler samplers use): an epsilon model divides by 0 there, a v-prediction model is fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from models.noise_schedule import NoiseSchedule
from models.samplers.base import (
    NoiseSource,
    Plan,
    RowState,
    Sampler,
    StepResult,
    advanced,
    alphas_add_noise,
    at_step,
    first_step,
    per_row,
)
from schemas.generation import Generation

# diffusers' LCMScheduler defaults for the options a scheduler config may leave out
ORIGINAL_STEPS_DEFAULT = 50
TIMESTEP_SCALING_DEFAULT = 10.0
CLIP_SAMPLE_DEFAULT = False
CLIP_SAMPLE_RANGE_DEFAULT = 1.0
SIGMA_DATA = 0.5  # the consistency model's boundary-condition scale (diffusers' fixed value)


def _zeros() -> torch.Tensor:
    return torch.zeros(1)


@dataclass(frozen=True)
class LCMPlan(Plan):
    """Per step (steps,) float32: the square roots of alpha_bar and 1 - alpha_bar at this timestep
    and at the next one, and the boundary-condition scalings."""

    sqrt_alpha: torch.Tensor = field(default_factory=_zeros)
    sqrt_beta: torch.Tensor = field(default_factory=_zeros)
    sqrt_alpha_next: torch.Tensor = field(default_factory=_zeros)
    sqrt_beta_next: torch.Tensor = field(default_factory=_zeros)
    c_skip: torch.Tensor = field(default_factory=_zeros)
    c_out: torch.Tensor = field(default_factory=_zeros)
    clip_range: float | None = None  # clamp x0 to [-range, range] (clip_sample), None: no clamp


def lcm_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """LCMScheduler.set_timesteps(steps): (steps,) int64, first (noisiest) first."""
    n = schedule.num_train_timesteps
    original = int(schedule.option("original_inference_steps", ORIGINAL_STEPS_DEFAULT))
    if original > n:
        raise ValueError(f"original_inference_steps {original} exceeds the model's {n} training timesteps")
    if not 1 <= steps <= original:
        raise ValueError(
            f"the lcm sampler takes 1 to {original} steps on this model (its original_inference_steps), "
            f"got {steps}"
        )
    k = n // original
    origin = (np.asarray(list(range(1, original + 1))) * k - 1)[::-1].copy()
    indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[indices]


def lcm_plan(schedule: NoiseSchedule, generation: Generation) -> LCMPlan:
    """LCMScheduler.set_timesteps for the request, and every step's scalars as its `step` computes them."""
    timesteps = torch.from_numpy(lcm_timesteps(schedule, generation.steps))
    alphas_cumprod = schedule.alphas_cumprod
    columns: dict[str, list[torch.Tensor]] = {
        name: [] for name in ("a", "b", "a_next", "b_next", "skip", "out")
    }
    scaling = float(schedule.option("timestep_scaling", TIMESTEP_SCALING_DEFAULT))
    for i, t in enumerate(timesteps):
        # the last step's "next" timestep is its own (diffusers); its sample is the estimate itself
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else t
        alpha_prod, alpha_prod_next = alphas_cumprod[t], alphas_cumprod[t_next]  # t_next >= 0 always
        scaled = t * scaling  # float32, as diffusers' int64 tensor times a float
        columns["skip"].append(SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2))
        columns["out"].append(scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5)
        columns["a"].append(alpha_prod.sqrt())
        columns["b"].append((1 - alpha_prod).sqrt())
        columns["a_next"].append(alpha_prod_next.sqrt())
        columns["b_next"].append((1 - alpha_prod_next).sqrt())
    stacked = {name: torch.stack(values).to(torch.float32) for name, values in columns.items()}
    clip = bool(schedule.option("clip_sample", CLIP_SAMPLE_DEFAULT))
    return LCMPlan(
        timesteps=timesteps.to(torch.float32),
        init_noise_sigma=1.0,
        sqrt_alpha=stacked["a"],
        sqrt_beta=stacked["b"],
        sqrt_alpha_next=stacked["a_next"],
        sqrt_beta_next=stacked["b_next"],
        c_skip=stacked["skip"],
        c_out=stacked["out"],
        clip_range=float(schedule.option("clip_sample_range", CLIP_SAMPLE_RANGE_DEFAULT)) if clip else None,
        start=first_step(generation, len(timesteps)),
    )


def predicted_original(
    prediction_type: str, model_output: torch.Tensor, samples: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """x0 from the model's output; a, b: per-row sqrt(alpha_bar), sqrt(1 - alpha_bar)."""
    if prediction_type == "epsilon":
        return (samples - b * model_output) / a
    if prediction_type == "v_prediction":
        return a * samples - b * model_output
    return model_output  # "sample"


class LCM(Sampler):
    name = "lcm"

    def plan(self, schedule: NoiseSchedule, generation: Generation) -> LCMPlan:
        return lcm_plan(schedule, generation)

    def step(
        self,
        schedule: NoiseSchedule,
        model_output: torch.Tensor,
        samples: torch.Tensor,
        rows: Sequence[RowState],
        noise: NoiseSource,
    ) -> StepResult:
        plans = [row.plan for row in rows]
        assert all(isinstance(plan, LCMPlan) for plan in plans)
        a = per_row(at_step(rows, "sqrt_alpha"), samples)
        b = per_row(at_step(rows, "sqrt_beta"), samples)
        x0 = predicted_original(schedule.prediction_type, model_output, samples, a, b)
        clip_range = plans[0].clip_range  # type: ignore[attr-defined]  # one model: one option
        if clip_range is not None:
            x0 = x0.clamp(-clip_range, clip_range)
        # the consistency function f(x, t)
        c_out = per_row(at_step(rows, "c_out"), samples)
        c_skip = per_row(at_step(rows, "c_skip"), samples)
        denoised = c_out * x0 + c_skip * samples
        # every step but a row's last noises the estimate to the next timestep with fresh noise
        draws = [row.step_index + 1 < row.plan.steps for row in rows]
        updated = denoised
        if any(draws):
            fresh = noise(draws)
            a_next = per_row(at_step(rows, "sqrt_alpha_next"), samples)
            b_next = per_row(at_step(rows, "sqrt_beta_next"), samples)
            renoised = a_next * denoised + b_next * fresh
            updated = torch.where(per_row(draws, samples) > 0, renoised, denoised)
        return StepResult(samples=updated, states=advanced(rows), denoised=denoised)

    def add_noise(
        self,
        schedule: NoiseSchedule,
        original: torch.Tensor,
        noise: torch.Tensor,
        plans: Sequence[Plan],
        levels: Sequence[int],
    ) -> torch.Tensor:
        """LCMScheduler.add_noise at each row's timestep: alpha_bar of the training schedule."""
        timesteps = torch.stack([plan.timesteps[level] for plan, level in zip(plans, levels, strict=True)])
        return alphas_add_noise(schedule.alphas_cumprod[timesteps.long()], original, noise)
