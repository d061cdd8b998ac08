"""A model's training noise schedule: its scheduler_config.json, and the alphas it defines.

Every sampler reads its options from the same config with its own defaults for the keys the file
leaves out, exactly as diffusers' `SchedulerClass.from_config(config)` does (the defaults differ
between diffusers' scheduler classes: DDIM spaces timesteps "leading" by default, Euler "linspace").
The training betas use the defaults every diffusers scheduler that we match shares.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# diffusers' defaults for the keys that define the training schedule.
TRAINING_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "thresholding": False,
}


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the squaredcos_cap_v2 schedule (Nichol & Dhariwal 2021)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def training_betas(config: Mapping[str, Any]) -> torch.Tensor:
    """(num_train_timesteps,) float32 betas, as diffusers' schedulers compute them from `config`
    (merged with TRAINING_DEFAULTS); ValueError naming a key we cannot honour."""
    cfg = {**TRAINING_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    n = int(cfg["num_train_timesteps"])
    if n < 1:
        raise ValueError(f"scheduler num_train_timesteps must be >= 1, got {n}")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        if betas.shape != (n,):
            raise ValueError(f"scheduler trained_betas has {betas.numel()} values, expected {n}")
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = cosine_betas(n)
    else:
        raise ValueError(
            f"scheduler beta_schedule must be one of {BETA_SCHEDULES}, got {cfg['beta_schedule']!r}"
        )
    if cfg["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    return betas


@dataclass(frozen=True)
class NoiseSchedule:
    """The model's scheduler config and the training schedule it defines."""

    config: Mapping[str, Any] = field(repr=False)
    num_train_timesteps: int
    prediction_type: str
    alphas_cumprod: torch.Tensor = field(repr=False)  # (num_train_timesteps,) float32, CPU

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """From a diffusers scheduler_config.json dict (any scheduler class); ValueError naming a key
        that no sampler here can honour."""
        cfg = {**TRAINING_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type must be one of {PREDICTION_TYPES}, got {cfg['prediction_type']!r}"
            )
        spacing = config.get("timestep_spacing")
        if spacing is not None and spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"scheduler timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}"
            )
        if cfg["thresholding"]:
            raise ValueError("scheduler thresholding=true is not supported (no SD model uses it)")
        betas = training_betas(config)
        return cls(
            config=dict(config),
            num_train_timesteps=int(cfg["num_train_timesteps"]),
            prediction_type=cfg["prediction_type"],
            alphas_cumprod=torch.cumprod(1.0 - betas, dim=0),
        )

    def option(self, key: str, default: Any) -> Any:
        """A sampler option from the config, `default` (the matching diffusers class's) when absent."""
        value = self.config.get(key)
        return default if value is None else value

    @functools.cached_property
    def max_steps(self) -> int:
        """The most inference steps whose timesteps all exist with the model's own spacing."""
        from models.samplers.ddim import DDIMSchedule

        return DDIMSchedule.from_config(dict(self.config)).max_steps
