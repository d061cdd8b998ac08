"""What every sampler is: a plan per request, a state per image, and one vectorised step per call.

A UNet call holds rows of different samplers, schedules and step counts. After it, the pipeline
groups the rows by sampler and calls each sampler's `step` once for its rows, every row with its
own plan (the request's timesteps and noise levels), its own position in it, its own history of
model outputs (multistep samplers) and its own CPU generator (samplers that add noise). A step
returns new values and changes nothing: the pipeline commits them only when every group's step
succeeded, so a retried step (out of memory, a batch-mate's failure) never advances a history twice.

Each sampler matches one diffusers scheduler built with `from_config(model's scheduler config)`,
line by line where the arithmetic matters (same operations, same dtypes), and says where diffusers
is odd and we copy it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from models.noise_schedule import NoiseSchedule
from models.transfer import to_device
from schemas.generation import Generation


@dataclass(frozen=True)
class Plan:
    """One request's schedule, shared by its images. Subclasses add what their step reads per step.

    img2img and inpainting run only the end of the schedule, as diffusers' pipelines do: the plan is the
    whole schedule of `steps` (what the samplers' arithmetic reads: DDIM's step size, the indices of
    the multistep samplers' previous noise levels), and its images start at step `start` (diffusers'
    `t_start`, set with `set_begin_index`), from the init image noised to that step's level.
    """

    timesteps: torch.Tensor  # (steps,) float32 CPU: what the UNet is told at each step
    init_noise_sigma: float  # the initial latent is standard normal noise times this
    start: int = field(default=0, kw_only=True)  # the first step run: 0, or img2img's t_start

    @property
    def steps(self) -> int:
        """The steps of the whole schedule (an img2img run takes the last `steps - start` of them)."""
        return len(self.timesteps)

    @property
    def steps_to_run(self) -> int:
        return self.steps - self.start


@dataclass(frozen=True)
class RowState:
    """One image's place in its plan. Immutable: a step returns the next one."""

    plan: Plan
    step_index: int = 0
    history: tuple[torch.Tensor, ...] = ()  # previous model outputs (newest last), (1, C, h, w) each
    last_sample: torch.Tensor | None = None  # the sample before the last step (UniPC's corrector)

    @classmethod
    def first(cls, plan: Plan) -> RowState:
        """An image's state before its first step: at the plan's start."""
        return cls(plan, plan.start)

    @property
    def done(self) -> bool:
        return self.step_index >= self.plan.steps


@dataclass
class StepResult:
    """What one sampler's step gives its rows, to be committed together."""

    samples: torch.Tensor  # (R, C, h, w) float32: each row's next latent
    states: list[RowState]  # each row's next state
    denoised: torch.Tensor | None = None  # (R, C, h, w): each row's current estimate of the clean latent


# Noise for the rows of a step: for each row marked True, one (1, C, h, w) standard normal draw from
# that row's own generator (as diffusers draws it from the image's generator); zeros elsewhere.
NoiseSource = Callable[[Sequence[bool]], torch.Tensor]


class Sampler(ABC):
    """A sampler: how a request's steps are planned, how the UNet's input is scaled, and one step."""

    name: str = ""

    @abstractmethod
    def plan(self, schedule: NoiseSchedule, generation: Generation) -> Plan:
        """The plan of a request: its steps, following its scheduler (schemas/samplers.py)."""

    def scale_input(self, samples: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
        """The UNet's input for these rows' latents (diffusers' `scale_model_input`); default: as is."""
        return samples

    @abstractmethod
    def step(
        self,
        schedule: NoiseSchedule,
        model_output: torch.Tensor,
        samples: torch.Tensor,
        rows: Sequence[RowState],
        noise: NoiseSource,
    ) -> StepResult:
        """One step for every row: (R, C, h, w) float32 model outputs (after guidance) and latents."""

    @abstractmethod
    def add_noise(
        self,
        schedule: NoiseSchedule,
        original: torch.Tensor,
        noise: torch.Tensor,
        plans: Sequence[Plan],
        levels: Sequence[int],
    ) -> torch.Tensor:
        """Clean latents (R, C, h, w) float32 noised with `noise` (R, C, h, w) to the noise level before
        step `levels[r]` of `plans[r]`, in this sampler's scale: the diffusers scheduler's `add_noise`
        (img2img's first latent at the plan's start; inpainting's blend after each step)."""


# --- helpers shared by the samplers ----------------------------------------------------------------


def first_step(generation: Generation, steps: int) -> int:
    """The step a request's run starts at (Generation.first_step) in a schedule of `steps` steps."""
    start = generation.first_step
    if start >= steps:
        raise ValueError(
            f"strength {generation.strength} starts the run at step {start} of a schedule of {steps} steps: "
            "nothing would run (raise strength or steps)"
        )
    return start


def alphas_add_noise(
    alphas_cumprod: torch.Tensor, original: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise, one (R,) float32 alpha_bar per row: the forward
    process on the variance-preserving scale, as DDIM's and LCM's `add_noise`."""
    sqrt_alpha = per_row(alphas_cumprod**0.5, original)
    sqrt_one_minus_alpha = per_row((1 - alphas_cumprod) ** 0.5, original)
    return sqrt_alpha * original + sqrt_one_minus_alpha * noise


def sigmas_add_noise(sigmas: torch.Tensor, original: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """alpha_t x0 + sigma_t noise for one (R,) float32 VE sigma per row, alpha_t = 1 / sqrt(sigma^2 + 1)
    and sigma_t = sigma alpha_t: the DPM-Solver and UniPC schedulers' `add_noise` (the latent on the
    variance-preserving scale, the plan in sigmas)."""
    alpha_t = 1 / ((sigmas**2 + 1) ** 0.5)
    sigma_t = sigmas * alpha_t
    return per_row(alpha_t, original) * original + per_row(sigma_t, original) * noise


def at_levels(plans: Sequence[Plan], name: str, levels: Sequence[int]) -> torch.Tensor:
    """(R,) float32: each plan's `<name>[level]`."""
    return torch.stack([getattr(plan, name)[level] for plan, level in zip(plans, levels, strict=True)])


def per_row(values: Sequence[float | torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(R,) scalars as an (R, 1, ..., 1) tensor of `like`'s dtype on its device, to broadcast per row."""
    column = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values]).to(like.dtype)
    return to_device(column, like.device).view(-1, *([1] * (like.dim() - 1)))


def at_step(rows: Sequence[RowState], name: str, offset: int = 0) -> list[torch.Tensor]:
    """Each row's `plan.<name>[step_index + offset]` (0-d tensors)."""
    return [getattr(row.plan, name)[row.step_index + offset] for row in rows]


def advanced(rows: Sequence[RowState], history: torch.Tensor | None = None, keep: int = 1,
             samples: torch.Tensor | None = None) -> list[RowState]:  # fmt: skip
    """Each row one step further; with `history` (R, C, h, w), that row's output appended (the newest
    `keep` kept); with `samples`, each row's sample before this step remembered as `last_sample`."""
    next_states = []
    for i, row in enumerate(rows):
        past = row.history
        if history is not None:
            past = (*past, history[i : i + 1])[-keep:]
        last = samples[i : i + 1] if samples is not None else row.last_sample
        next_states.append(RowState(row.plan, row.step_index + 1, past, last))
    return next_states


def spaced_timesteps(spacing: str, num_train_timesteps: int, steps: int, steps_offset: int) -> np.ndarray:
    """diffusers' float32 timestep spacings of EulerDiscrete/EulerAncestral (`set_timesteps`), first
    (noisiest) first. (DDIM rounds "linspace" to integers; its own module keeps that.)"""
    n = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = n // steps
        timesteps = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32)
        return timesteps + steps_offset
    if spacing == "trailing":
        ratio = n / steps
        return np.arange(n, 0, -ratio).round().copy().astype(np.float32) - 1
    raise ValueError(f"timestep_spacing must be linspace, leading or trailing, got {spacing!r}")


def karras_sigmas(in_sigmas: np.ndarray, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (eq. 5) between the schedule's smallest and largest sigma, as diffusers'
    `_convert_to_karras` (float64)."""
    sigma_min, sigma_max = float(in_sigmas[-1]), float(in_sigmas[0])
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(in_sigmas: np.ndarray, steps: int) -> np.ndarray:
    """Sigmas evenly spaced in log between the largest and the smallest, as diffusers'
    `_convert_to_exponential` (float64)."""
    sigma_min, sigma_max = float(in_sigmas[-1]), float(in_sigmas[0])
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), steps))


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma, interpolated in log sigma, as diffusers'
    `_sigma_to_t`."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


@dataclass(frozen=True)
class SigmaPlan(Plan):
    """A plan on the sigma (variance-exploding) scale: x = x0 + sigma * noise."""

    sigmas: torch.Tensor = field(default_factory=lambda: torch.zeros(1))  # (steps + 1,) float32 CPU
