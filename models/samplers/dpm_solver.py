"""What DPM-Solver++ samplers share (Lu et al. 2022, https://arxiv.org/abs/2211.01095): the plan of a
request and each row's scalars for one step, as diffusers' `DPMSolverMultistepScheduler` computes them.

The latent lives on the variance-preserving scale, x = alpha_t * x0 + sigma_t * noise (so the UNet's
input is not rescaled and the initial noise is standard normal), while the plan is made of sigmas on
the variance-exploding scale, sigma = sigma_t / alpha_t, as diffusers keeps it. The solver steps in
lambda_t = log(alpha_t / sigma_t), the half log-SNR, with h = lambda_next - lambda_now.

diffusers' quirks that we copy on purpose:
- Its timestep spacings are neither DDIM's nor Euler's: "linspace" and "leading" space steps + 1
  timesteps and drop the last (so a run never reaches timestep 0), and all are integers.
- karras and exponential plans span the whole training range (sigma at t = 0 to t = 999), not the
  spaced timesteps' range as Euler's do. The UNet is told each sigma's timestep, rounded for karras
  (except with the squaredcos_cap_v2 schedule) and truncated for exponential (an int64 cast), while
  the solver keeps the exact karras/exponential sigma.
- alpha_t and sigma_t come from the sigmas (alpha_t = 1 / sqrt(sigma^2 + 1)), not from the training
  alphas_cumprod of the timestep.
- With zero terminal SNR (`rescale_betas_zero_snr`), alphas_cumprod at the last training step is
  2**-24 (float16's smallest subnormal) instead of 0, so the first sigma is 4096, not infinite.
- `final_sigmas_type` "zero" (its default) ends on sigma 0, and then the last step is always first
  order (x0 itself); "sigma_min" ends on the smallest training sigma. `lower_order_final` (its
  default) makes the last step first order too, but only in runs shorter than 15 steps; and its
  "lower order second-to-last step" changes nothing at order 2. The first step is first order (no
  previous output yet).
- `lambda_min_clipped` cuts the spaced timesteps' range (for the cosine schedule); -inf by default.

Deliberate differences: when a plan's first timestep appears twice (karras or exponential with zero
terminal SNR or the cosine schedule, and many steps: 999, 999, ...), diffusers starts at step index 1
(its `index_for_timestep`) and fails with an IndexError at the last step; we run the plan from its
start. The sigma schedule is the request's: a model config's `use_karras_sigmas` and the like are not
read (as for Euler), and solver_order and algorithm_type are the sampler's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.noise_schedule import NoiseSchedule
from models.samplers.base import (
    Plan,
    RowState,
    Sampler,
    at_levels,
    exponential_sigmas,
    first_step,
    karras_sigmas,
    sigma_to_t,
    sigmas_add_noise,
)
from models.samplers.euler import training_sigmas
from models.transfer import to_device
from schemas.generation import Generation

# diffusers' DPMSolverMultistepScheduler defaults for the options a scheduler config may leave out
DEFAULTS: dict[str, Any] = {
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "beta_schedule": "linear",
}
# solver types of other schedulers' configs that diffusers' constructor turns into "midpoint"
_MIDPOINT_ALIASES = ("logrho", "bh1", "bh2")
# diffusers applies `lower_order_final` only to runs shorter than this many steps
LOWER_ORDER_FINAL_BELOW_STEPS = 15


@dataclass(frozen=True)
class DPMSolverPlan(Plan):
    """A request's DPM-Solver++ schedule. Index i of the (steps + 1,) tensors is the noise level before
    step i; the last one is where the run ends (sigma 0 with final_sigmas_type "zero")."""

    sigmas: torch.Tensor  # (steps + 1,) float32 CPU: sigma_t / alpha_t
    alpha_t: torch.Tensor  # (steps + 1,) float32 CPU: 1 / sqrt(sigma^2 + 1)
    sigma_t: torch.Tensor  # (steps + 1,) float32 CPU: sigma * alpha_t
    lambda_t: torch.Tensor  # (steps + 1,) float32 CPU: log(alpha_t) - log(sigma_t), inf at sigma 0
    orders: torch.Tensor  # (steps,) int64 CPU: 1 or 2, the solver order of each step
    heun: bool  # solver_type "heun" (else "midpoint"): how the second-order term is weighted


def option(schedule: NoiseSchedule, key: str) -> Any:
    return schedule.option(key, DEFAULTS[key])


def solver_timesteps(spacing: str, last_timestep: int, num_train_timesteps: int, steps: int,
                     steps_offset: int) -> np.ndarray:  # fmt: skip
    """diffusers' DPMSolverMultistep timestep spacings (`set_timesteps`), (<= steps,) int64, noisiest
    first. `last_timestep` is num_train_timesteps unless lambda_min_clipped cuts the range ("trailing"
    then gives fewer timesteps when it does, as there)."""
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last_timestep // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return timesteps + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / steps
        return np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be linspace, leading or trailing, got {spacing!r}")


def _training_alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """alphas_cumprod as diffusers' DPMSolverMultistep keeps it: 2**-24 at the last step with zero
    terminal SNR (float32)."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    if schedule.option("rescale_betas_zero_snr", False):
        alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def _last_timestep(schedule: NoiseSchedule) -> int:
    """The end of the spaced range: the training steps whose lambda_t is at least lambda_min_clipped."""
    alphas_cumprod = _training_alphas_cumprod(schedule)
    lambda_t = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    clipped = torch.searchsorted(torch.flip(lambda_t, [0]), float(option(schedule, "lambda_min_clipped")))
    return schedule.num_train_timesteps - int(clipped)


def _checked_options(schedule: NoiseSchedule) -> tuple[str, str]:
    """(solver_type, final_sigmas_type) of the model's config; ValueError for what we cannot honour."""
    solver_type = option(schedule, "solver_type")
    solver_type = "midpoint" if solver_type in _MIDPOINT_ALIASES else solver_type
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"scheduler solver_type must be midpoint or heun, got {solver_type!r}")
    final = option(schedule, "final_sigmas_type")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"scheduler final_sigmas_type must be zero or sigma_min, got {final!r}")
    if option(schedule, "variance_type") is not None:
        raise ValueError(
            f"scheduler variance_type={option(schedule, 'variance_type')!r} (a learned variance) is not "
            "supported by the DPM-Solver++ samplers"
        )
    return solver_type, final


def solver_plan(schedule: NoiseSchedule, generation: Generation) -> DPMSolverPlan:
    """DPMSolverMultistepScheduler.set_timesteps for the request's steps and scheduler: sgm_uniform is
    "trailing" spacing; karras and exponential replace the spaced sigmas (see the module's notes)."""
    solver_type, final_sigmas_type = _checked_options(schedule)
    steps = generation.steps
    spacing = "trailing" if generation.scheduler == "sgm_uniform" else option(schedule, "timestep_spacing")
    timesteps = solver_timesteps(
        spacing,
        _last_timestep(schedule),
        schedule.num_train_timesteps,
        steps,
        int(option(schedule, "steps_offset")),
    )
    all_sigmas = training_sigmas(schedule)  # (num_train_timesteps,) float32, ascending
    log_sigmas = np.log(all_sigmas)
    if generation.scheduler in ("karras", "exponential"):
        descending = np.flip(all_sigmas).copy()
        if generation.scheduler == "karras":
            sigmas = karras_sigmas(descending, steps)
        else:
            sigmas = exponential_sigmas(descending, steps)
        fractional = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        if generation.scheduler == "karras" and option(schedule, "beta_schedule") != "squaredcos_cap_v2":
            fractional = fractional.round()
        timesteps = fractional.astype(np.int64)  # diffusers' int64 cast truncates
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(all_sigmas)), all_sigmas)

    if final_sigmas_type == "zero":
        sigma_last = 0.0
    else:  # "sigma_min": the sigma of the first training step, in float32
        alpha_bar = _training_alphas_cumprod(schedule)[0]
        sigma_last = float(((1 - alpha_bar) / alpha_bar) ** 0.5)
    sigmas_t = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
    # diffusers' _sigma_to_alpha_sigma_t and lambda, per sigma (elementwise: the same bits as its 0-d ops)
    alpha_t = 1 / ((sigmas_t**2 + 1) ** 0.5)
    sigma_t = sigmas_t * alpha_t
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)

    count = len(timesteps)
    start = first_step(generation, count)
    orders = torch.full((count,), 2, dtype=torch.int64)
    orders[0] = 1  # no previous output yet
    orders[start] = 1  # nor at the start of an img2img run (diffusers' lower_order_nums is 0 there)
    if (
        option(schedule, "euler_at_final")
        or (option(schedule, "lower_order_final") and count < LOWER_ORDER_FINAL_BELOW_STEPS)
        or final_sigmas_type == "zero"
    ):
        orders[-1] = 1
    return DPMSolverPlan(
        timesteps=torch.from_numpy(timesteps.astype(np.float32)),
        init_noise_sigma=1.0,
        sigmas=sigmas_t,
        alpha_t=alpha_t,
        sigma_t=sigma_t,
        lambda_t=lambda_t,
        orders=orders,
        heun=solver_type == "heun",
        start=start,
    )


class DPMSolverSampler(Sampler):
    """A DPM-Solver++ sampler: the plan is shared, each subclass writes its update."""

    def plan(self, schedule: NoiseSchedule, generation: Generation) -> DPMSolverPlan:
        return solver_plan(schedule, generation)

    def add_noise(
        self,
        schedule: NoiseSchedule,
        original: torch.Tensor,
        noise: torch.Tensor,
        plans: Sequence[Plan],
        levels: Sequence[int],
    ) -> torch.Tensor:
        """DPMSolverMultistepScheduler.add_noise: alpha_t x0 + sigma_t noise at each row's sigma."""
        return sigmas_add_noise(at_levels(plans, "sigmas", levels), original, noise)


# --- one step, vectorised over rows ---------------------------------------------------------------


@dataclass(frozen=True)
class StepScalars:
    """Each row's scalars for its current step i, (R,) float32 on the CPU: s0 is the noise level now
    (index i), t the next one (i + 1), s1 the previous one (i - 1). diffusers computes these as 0-d
    float32 CPU tensors with the same elementwise operations, so they are the same bits."""

    alpha_s0: torch.Tensor
    sigma_s0: torch.Tensor
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    h: torch.Tensor  # lambda_t - lambda_s0
    inv_r0: torch.Tensor  # 1 / r0, r0 = (lambda_s0 - lambda_s1) / h; 0 where the step is first order
    second_order: torch.Tensor  # (R,) bool
    heun: torch.Tensor  # (R,) bool: the row's solver_type is "heun"


def step_scalars(rows: Sequence[RowState]) -> StepScalars:
    plans = [row.plan for row in rows]
    if not all(isinstance(plan, DPMSolverPlan) for plan in plans):
        raise TypeError("the DPM-Solver++ samplers step only rows planned by them")

    def gather(name: str, offset: int = 0) -> torch.Tensor:
        return torch.stack([getattr(row.plan, name)[max(row.step_index + offset, 0)] for row in rows])

    second = gather("orders") == 2
    lambda_t, lambda_s0, lambda_s1 = gather("lambda_t", 1), gather("lambda_t"), gather("lambda_t", -1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    return StepScalars(
        alpha_s0=gather("alpha_t"),
        sigma_s0=gather("sigma_t"),
        alpha_t=gather("alpha_t", 1),
        sigma_t=gather("sigma_t", 1),
        h=h,
        inv_r0=torch.where(second, 1.0 / r0, 0.0),
        second_order=second,
        heun=torch.tensor([plan.heun for plan in plans]),  # type: ignore[attr-defined]
    )


def columns(like: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
    """(R,) CPU scalars as (R, 1, ..., 1) tensors of `like`'s dtype on its device, in one copy."""
    stacked = to_device(torch.stack(values).to(like.dtype), like.device)
    return list(stacked.view(len(values), -1, *([1] * (like.dim() - 1))).unbind(0))


def row_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An (R,) bool CPU mask as (R, 1, ..., 1) on `like`'s device."""
    return to_device(mask, like.device).view(-1, *([1] * (like.dim() - 1)))


def data_prediction(prediction_type: str, model_output: torch.Tensor, samples: torch.Tensor,
                    alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """x0 from the model's output (diffusers' `convert_model_output` for DPM-Solver++), per row."""
    if prediction_type == "epsilon":
        return (samples - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * samples - sigma_t * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"the DPM-Solver++ samplers need epsilon, v_prediction or sample, not {prediction_type}")


def previous_predictions(rows: Sequence[RowState], current: torch.Tensor) -> torch.Tensor:
    """(R, C, h, w): each row's x0 estimate of its previous step; its current one where it has none
    (its first step, which is first order and does not read it)."""
    previous = []
    for i, row in enumerate(rows):
        if row.history:
            previous.append(row.history[-1])
        elif int(row.plan.orders[row.step_index]) == 2:  # type: ignore[attr-defined]
            raise RuntimeError(f"a second-order step {row.step_index} without the previous output")
        else:
            previous.append(current[i : i + 1])
    return torch.cat(previous)
