"""DDIM sampling (Song et al. 2020, https://arxiv.org/abs/2010.02502) as pure tensor functions.

Every row of a batch carries its own timestep, its own number of inference steps, its own eta and
its own guidance scale, so requests at different points of their trajectories share one UNet call.
The arithmetic follows diffusers' ``DDIMScheduler`` line by line (our numerical reference), including
its quirks: the previous timestep is always ``t - num_train_timesteps // num_steps``, whatever the
spacing, and a negative previous timestep uses ``final_alpha_cumprod``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.transfer import to_device

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

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


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the squaredcos_cap_v2 schedule (Nichol & Dhariwal 2021)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


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
        if n < 1:
            raise ValueError(f"scheduler num_train_timesteps must be >= 1, got {n}")
        for key, allowed in (
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
        ):
            if cfg[key] not in allowed:
                raise ValueError(f"scheduler {key} must be one of {allowed}, got {cfg[key]!r}")
        if cfg["thresholding"]:
            raise ValueError("scheduler thresholding=true is not supported (no SD 1.x/2.x model uses it)")

        if cfg["trained_betas"] is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
            if betas.shape != (n,):
                raise ValueError(f"scheduler trained_betas has {betas.numel()} values, expected {n}")
        elif cfg["beta_schedule"] == "linear":
            betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
        elif cfg["beta_schedule"] == "scaled_linear":
            betas = (
                torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
            )
        elif cfg["beta_schedule"] == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise ValueError(
                f"scheduler beta_schedule must be one of {BETA_SCHEDULES}, got {cfg['beta_schedule']!r}"
            )
        if cfg["rescale_betas_zero_snr"]:
            betas = _rescale_zero_terminal_snr(betas)

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


def guided_noise(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + g * (cond - uncond)``, one g per row ((B,) float32)."""
    g = to_device(guidance_scale.to(cond.dtype), cond.device).view(-1, *([1] * (cond.dim() - 1)))
    return uncond + g * (cond - uncond)


def ddim_step(
    schedule: DDIMSchedule,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    num_steps: torch.Tensor,
    eta: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update x_t -> x_{t-1} (formula (12) of the paper), each row with its own parameters.

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
    return prev_sample
