"""DDIM sampling (Song et al. 2020, https://arxiv.org/abs/2010.02502) as pure tensor functions.

Every row of a batch carries its own timestep, its own number of inference steps, its own eta and
its own guidance scale, so requests at different points of their trajectories share one UNet call.
The arithmetic follows diffusers' ``DDIMScheduler`` line by line (our numerical reference), including
its quirks: the previous timestep is always ``t - num_train_timesteps // num_steps``, whatever the
spacing, and a negative previous timestep uses ``final_alpha_cumprod``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.noise_schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS, NoiseSchedule, training_betas
from models.samplers.base import (
    NoiseSource,
    Plan,
    RowState,
    Sampler,
    StepResult,
    advanced,
    alphas_add_noise,
    first_step,
)
from models.transfer import to_device
from schemas.generation import Generation

# diffusers' DDIMScheduler defaults, used for keys a scheduler_config.json leaves out, so a folder
# gives the same schedule here as DDIMScheduler.from_pretrained(folder) gives there.
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


@dataclass(frozen=True)
class DDIMSchedule:
    """The training noise schedule and the sampling options of one model."""

    num_train_timesteps: int
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32, CPU
    final_alpha_cumprod: torch.Tensor  # () float32: alpha_prod used when the previous timestep < 0
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    clip_sample: bool
    clip_sample_range: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DDIMSchedule:
        """Build from a diffusers ``scheduler_config.json`` dict (any scheduler class: only the
        training schedule and the DDIM options are read)."""
        cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS and v is not None}}
        n = int(cfg["num_train_timesteps"])
        for key, allowed in (
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
        ):
            if cfg[key] not in allowed:
                raise ValueError(f"scheduler {key} must be one of {allowed}, got {cfg[key]!r}")
        if cfg["thresholding"]:
            raise ValueError("scheduler thresholding=true is not supported (no SD 1.x/2.x model uses it)")

        betas = training_betas(cfg)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        final = torch.tensor(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0].clone()
        return cls(
            num_train_timesteps=n,
            alphas_cumprod=alphas_cumprod,
            final_alpha_cumprod=final,
            prediction_type=cfg["prediction_type"],
            timestep_spacing=cfg["timestep_spacing"],
            steps_offset=int(cfg["steps_offset"]),
            clip_sample=bool(cfg["clip_sample"]),
            clip_sample_range=float(cfg["clip_sample_range"]),
        )

    @functools.cached_property
    def max_steps(self) -> int:
        """The most inference steps whose timesteps all exist (with leading spacing and
        steps_offset 1, 1000 steps would ask for timestep 1000 of 0..999)."""
        n = self.num_train_timesteps
        return next(s for s in range(n, 0, -1) if int(self._spaced(s).max()) < n)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The `num_steps` timesteps of a sampling run, first (noisiest) first: (num_steps,) int64.

        With 1000 training steps, leading spacing and steps_offset 1, 50 steps give 981, 961, ..., 1.
        """
        if not 1 <= num_steps <= self.max_steps:
            raise ValueError(f"steps must be between 1 and {self.max_steps}, got {num_steps}")
        return torch.from_numpy(self._spaced(num_steps))

    def _spaced(self, num_steps: int) -> np.ndarray:
        n = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = n // num_steps
            return (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + self.steps_offset
        return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1  # trailing


def ddim_step(
    schedule: DDIMSchedule,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    num_steps: torch.Tensor,
    eta: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update x_t -> x_{t-1}: `ddim_update`'s next sample only."""
    return ddim_update(schedule, model_output, sample, timesteps, num_steps, eta, noise)[0]


def ddim_update(
    schedule: DDIMSchedule,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    num_steps: torch.Tensor,
    eta: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t-1} (formula (12) of the paper), each row with its own parameters,
    and the predicted x_0 it went through (what a live preview shows).

    model_output, sample: (B, C, h, w); timesteps, num_steps: (B,) int; eta: (B,) float;
    noise: (B, C, h, w) standard normal noise for the rows with eta > 0 (ignored where eta == 0),
    or None when every eta is 0. Computes in the dtype of `sample` (keep it float32).
    """
    device, dtype = sample.device, sample.dtype
    shape = (-1,) + (1,) * (sample.dim() - 1)
    timesteps = timesteps.to("cpu", torch.int64)
    prev_timesteps = timesteps - schedule.num_train_timesteps // num_steps.to("cpu", torch.int64)

    alphas = schedule.alphas_cumprod
    alpha_prod_t = alphas[timesteps]
    alpha_prod_prev = torch.where(
        prev_timesteps >= 0, alphas[prev_timesteps.clamp(min=0)], schedule.final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    # variance sigma_t^2 of formula (16), scaled by eta
    variance = ((1 - alpha_prod_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    std_dev_t = eta.to("cpu", torch.float32) * variance**0.5

    def per_row(values: torch.Tensor) -> torch.Tensor:  # (B,) CPU -> (B, 1, ..., 1) on device
        return to_device(values.to(dtype), device).view(shape)

    a_t, b_t, a_prev, std = (
        per_row(alpha_prod_t),
        per_row(beta_prod_t),
        per_row(alpha_prod_prev),
        per_row(std_dev_t),
    )
    model_output = model_output.to(dtype)

    if schedule.prediction_type == "epsilon":
        pred_original = (sample - b_t**0.5 * model_output) / a_t**0.5
        pred_epsilon = model_output
    elif schedule.prediction_type == "v_prediction":
        pred_original = a_t**0.5 * sample - b_t**0.5 * model_output
        pred_epsilon = a_t**0.5 * model_output + b_t**0.5 * sample
    else:  # "sample"
        pred_original = model_output
        pred_epsilon = (sample - a_t**0.5 * pred_original) / b_t**0.5

    if schedule.clip_sample:
        pred_original = pred_original.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)

    # "direction pointing to x_t" and the predicted x_0 term of formula (12)
    direction = (1 - a_prev - std**2) ** 0.5 * pred_epsilon
    prev_sample = a_prev**0.5 * pred_original + direction
    if noise is not None:
        # rows with eta == 0 have std 0: their noise (zeros, or unused) changes nothing
        prev_sample = prev_sample + std * to_device(noise.to(dtype), device)
    return prev_sample, pred_original


@dataclass(frozen=True)
class DDIMPlan(Plan):
    schedule: DDIMSchedule | None = None  # the DDIM options of the request's spacing
    eta: float = 0.0


class DDIM(Sampler):
    """diffusers' DDIMScheduler; `sgm_uniform` is its "trailing" spacing."""

    name = "ddim"

    def __init__(self) -> None:
        self._options: dict[tuple[int, str], DDIMSchedule] = {}

    def options(self, schedule: NoiseSchedule, scheduler: str) -> DDIMSchedule:
        """The DDIM options of a model's schedule, with "trailing" spacing for sgm_uniform (cached)."""
        key = (id(schedule.config), scheduler)
        if key not in self._options:
            config = dict(schedule.config)
            if scheduler == "sgm_uniform":
                config["timestep_spacing"] = "trailing"
            self._options[key] = DDIMSchedule.from_config(config)
        return self._options[key]

    def plan(self, schedule: NoiseSchedule, generation: Generation) -> DDIMPlan:
        options = self.options(schedule, generation.scheduler)
        timesteps = options.timesteps(generation.steps).to(torch.float32)
        return DDIMPlan(
            timesteps=timesteps,
            init_noise_sigma=1.0,
            schedule=options,
            eta=generation.eta,
            start=first_step(generation, len(timesteps)),
        )

    def add_noise(
        self,
        schedule: NoiseSchedule,
        original: torch.Tensor,
        noise: torch.Tensor,
        plans: Sequence[Plan],
        levels: Sequence[int],
    ) -> torch.Tensor:
        """DDIMScheduler.add_noise at each row's timestep: alpha_bar of the training schedule."""
        alphas = []
        for plan, level in zip(plans, levels, strict=True):
            assert isinstance(plan, DDIMPlan) and plan.schedule is not None
            alphas.append(plan.schedule.alphas_cumprod[plan.timesteps[level].long()])
        return alphas_add_noise(torch.stack(alphas), original, noise)

    def step(
        self,
        schedule: NoiseSchedule,
        model_output: torch.Tensor,
        samples: torch.Tensor,
        rows: Sequence[RowState],
        noise: NoiseSource,
    ) -> StepResult:
        plans = [row.plan for row in rows]
        assert all(isinstance(plan, DDIMPlan) for plan in plans)
        # the rows' options differ only in spacing, which the plans' timesteps already hold
        options = plans[0].schedule
        timesteps = torch.stack(
            [plan.timesteps[row.step_index] for plan, row in zip(plans, rows, strict=True)]
        )
        num_steps = torch.tensor([plan.steps for plan in plans])
        eta = torch.tensor([plan.eta for plan in plans], dtype=torch.float32)
        draws = [plan.eta > 0 for plan in plans]
        variance_noise = noise(draws) if any(draws) else None
        updated, denoised = ddim_update(
            options, model_output, samples, timesteps.long(), num_steps, eta, variance_noise
        )
        return StepResult(samples=updated, states=advanced(rows), denoised=denoised)
