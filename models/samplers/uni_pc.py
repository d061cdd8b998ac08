"""UniPC (Zhao et al. 2023, https://arxiv.org/abs/2302.04867) as diffusers' `UniPCMultistepScheduler`:
at each step the UniC corrector refines the sample the last step predicted, using this step's model
output, then the UniP predictor of order p takes the next step from it with the last p outputs.

Both updates have one shape (the paper's B(h) variants; data prediction, diffusers' default): with
lambda = log(alpha_t / sigma_t) and h = lambda_t - lambda_s0,

    x_t = sigma_t / sigma_s0 * x - alpha_t * (e^-h - 1) * m0 - alpha_t * B(h) * sum_k rho_k D_k,
    D_k = (m_k - m0) / r_k,  r_k = (lambda_k - lambda_s0) / h,

where m0 is the newest converted output (x0, or epsilon with predict_x0 false), m_k the k-th older
one, B(h) is -h ("bh1") or e^-h - 1 ("bh2") and the rho solve the order conditions; the corrector
adds rho_t * (m_t - m0) with this step's output m_t. Every coefficient depends only on the request's
plan and the step index, so the plan computes them once per step with diffusers' float32 scalar
arithmetic (0-d tensors, the same operations in the same order) and a step applies them per row:
rows of any order, step count and schedule share one vectorised step, bit for bit as diffusers.
Each row's history holds its last `solver_order` converted outputs, and `last_sample` the corrected
sample its last predictor started from.

diffusers' behaviours copied on purpose:
- "linspace" and "leading" spacing space steps + 1 points and drop the last (the last timestep is
  not 0); the sigmas are those of the integer timesteps.
- karras and exponential sigmas span the whole training range (not the spaced timesteps' range);
  karras timesteps are rounded, exponential ones truncated to integers.
- `lower_order_final` lowers the order of the last steps whatever the step count (its documentation
  says "only for < 15 steps"); the first steps warm up from order 1.
- the corrector at step i has the order of step i - 1's predictor; `disable_corrector` lists the
  index of that previous step (diffusers tests `step_index - 1 not in disable_corrector`).
- the output is converted to x0 from the sample before correction, and the predictor of order 2 uses
  rho 1/2 where the corrector of order 2 solves its 2x2 system.
- zero terminal SNR: alpha_bar of the last training timestep is set to 2**-24 (as the Euler samplers).
"""

from __future__ import annotations

from collections import OrderedDict
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
    sigmas_add_noise,
)
from models.samplers.euler import training_sigmas
from schemas.generation import Generation

# diffusers' UniPCMultistepScheduler defaults for the options a scheduler config may leave out
SOLVER_ORDER_DEFAULT = 2
SOLVER_TYPE_DEFAULT = "bh2"
PREDICT_X0_DEFAULT = True
LOWER_ORDER_FINAL_DEFAULT = True
SPACING_DEFAULT = "linspace"
STEPS_OFFSET_DEFAULT = 0
FINAL_SIGMAS_TYPE_DEFAULT = "zero"
# options that select what we do not implement (their diffusers default is off)
_UNSUPPORTED = ("use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting")
PLANS_KEPT = 32  # plans cached per sampler: ~1 ms of scalar arithmetic per step to compute


def _zeros() -> torch.Tensor:
    return torch.zeros(1)


@dataclass(frozen=True)
class Update:
    """One kind of update (UniP or UniC) at every step of a plan, float32 CPU:
    x_t = x_scale * x - m0_scale * m0 - res_scale * (sum_k rhos[k] * (m_k - m0) / rks[k] + rho_t * (m_t - m0))
    Columns beyond a step's order have rho 0 and r 1, so they add exactly zero."""

    x_scale: torch.Tensor = field(default_factory=_zeros)  # (steps,)
    m0_scale: torch.Tensor = field(default_factory=_zeros)  # (steps,)
    res_scale: torch.Tensor = field(default_factory=_zeros)  # (steps,)
    rks: torch.Tensor = field(default_factory=_zeros)  # (steps, solver_order - 1)
    rhos: torch.Tensor = field(default_factory=_zeros)  # (steps, solver_order - 1)
    rho_t: torch.Tensor = field(default_factory=_zeros)  # (steps,): the corrector's weight of m_t


@dataclass(frozen=True)
class UniPCPlan(SigmaPlan):
    alpha_t: torch.Tensor = field(default_factory=_zeros)  # (steps,) 1 / sqrt(sigma^2 + 1)
    sigma_t: torch.Tensor = field(default_factory=_zeros)  # (steps,) sigma * alpha_t
    predictor: Update = field(default_factory=Update)
    corrector: Update = field(default_factory=Update)  # all zero where `corrects` is False
    orders: tuple[int, ...] = ()  # the predictor's order at each step
    corrects: tuple[bool, ...] = ()  # whether the corrector runs at each step
    solver_order: int = SOLVER_ORDER_DEFAULT
    predict_x0: bool = PREDICT_X0_DEFAULT


# --- the plan ---------------------------------------------------------------------------------------


def unipc_sigmas(schedule: NoiseSchedule, generation: Generation) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64, sigmas float32 with the final one appended), as UniPC's `set_timesteps`."""
    n, steps, scheduler = schedule.num_train_timesteps, generation.steps, generation.scheduler
    spacing = (
        "trailing" if scheduler == "sgm_uniform" else schedule.option("timestep_spacing", SPACING_DEFAULT)
    )
    if spacing == "linspace":
        timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = n // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        timesteps += schedule.option("steps_offset", STEPS_OFFSET_DEFAULT)
    elif spacing == "trailing":
        timesteps = np.arange(n, 0, -n / steps).round().copy().astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be linspace, leading or trailing, got {spacing!r}")

    final_type = schedule.option("final_sigmas_type", FINAL_SIGMAS_TYPE_DEFAULT)
    if final_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be zero or sigma_min, got {final_type!r}")
    all_sigmas = training_sigmas(schedule)  # float32
    if scheduler in ("karras", "exponential"):
        log_sigmas = np.log(all_sigmas)
        descending = np.flip(all_sigmas).copy()
        if scheduler == "karras":
            sigmas = karras_sigmas(descending, steps)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas]).round()
        else:
            sigmas = exponential_sigmas(descending, steps)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])  # truncated below
        last = sigmas[-1] if final_type == "sigma_min" else 0.0
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(all_sigmas)), all_sigmas)
        alpha_0 = schedule.alphas_cumprod[0]
        last = float(((1 - alpha_0) / alpha_0) ** 0.5) if final_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return np.asarray(timesteps).astype(np.int64), sigmas


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' `_sigma_to_alpha_sigma_t`: the VP scale (alpha_t, sigma_t) of a VE sigma."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


@dataclass(frozen=True)
class _Level:
    """One noise level on the VP scale, as diffusers computes it (0-d float32 tensors)."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor  # lambda = log(alpha) - log(sigma)

    @classmethod
    def of(cls, sigma: torch.Tensor) -> _Level:
        alpha_t, sigma_t = _alpha_sigma(sigma)
        return cls(alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t))


def _update(
    levels: list[_Level], t: int, s0: int, older: list[int], order: int, corrector: bool,
    predict_x0: bool, solver_type: str,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(x_scale, m0_scale, res_scale, rks, rhos, rho_t) of one update from level s0 to level t whose
    older outputs were at levels older[k], as `multistep_uni_p_bh_update` (corrector False) and
    `multistep_uni_c_bh_update` compute them: float32 0-d arithmetic, in diffusers' order."""
    level_t, level_s0 = levels[t], levels[s0]
    h = level_t.lam - level_s0.lam
    rks = [(levels[si].lam - level_s0.lam) / h for si in older[: order - 1]]
    r = torch.stack([*rks, torch.ones(())])

    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)  # B(h)
    factorial_i = 1
    rows, b = [], []
    for i in range(1, order + 1):  # the order conditions R rho = b
        rows.append(torch.pow(r, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    big_r, b_vec = torch.stack(rows), torch.stack(b)

    rho_t = torch.zeros(())
    if corrector:
        rhos = torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(big_r, b_vec)
        rhos, rho_t = rhos[:-1], rhos[-1]
    elif order == 2:
        rhos = torch.ones(1) * 0.5  # diffusers' simplified order 2
    elif order > 2:
        rhos = torch.linalg.solve(big_r[:-1, :-1], b_vec[:-1])
    else:
        rhos = torch.zeros(0)
    if predict_x0:
        scales = (level_t.sigma / level_s0.sigma, level_t.alpha * h_phi_1, level_t.alpha * b_h)
    else:
        scales = (level_t.alpha / level_s0.alpha, level_t.sigma * h_phi_1, level_t.sigma * b_h)
    return (*scales, torch.stack(rks) if rks else torch.zeros(0), rhos, rho_t)


def _stack_updates(updates: list[tuple[torch.Tensor, ...] | None], width: int) -> Update:
    """Per-step updates as an `Update`, columns padded to `width` (rho 0, r 1); None: all zero."""
    columns: list[list[torch.Tensor]] = [[], [], [], [], [], []]
    for update in updates:
        x_scale, m0_scale, res_scale, rks, rhos, rho_t = update or (torch.zeros(()),) * 3 + (
            torch.zeros(0), torch.zeros(0), torch.zeros(()),
        )  # fmt: skip
        pad = width - len(rks)
        rks = torch.cat([rks, torch.ones(pad)])
        rhos = torch.cat([rhos, torch.zeros(width - len(rhos))])
        for column, value in zip(columns, (x_scale, m0_scale, res_scale, rks, rhos, rho_t), strict=True):
            column.append(value.to(torch.float32))
    return Update(*(torch.stack(column) for column in columns))


def unipc_plan(schedule: NoiseSchedule, generation: Generation) -> UniPCPlan:
    """UniPCMultistepScheduler.set_timesteps for the request, and every step's orders and coefficients."""
    for key in _UNSUPPORTED:
        if schedule.option(key, False):
            raise ValueError(f"the uni_pc sampler does not support the scheduler option {key}=true")
    solver_order = int(schedule.option("solver_order", SOLVER_ORDER_DEFAULT))
    solver_type = schedule.option("solver_type", SOLVER_TYPE_DEFAULT)
    if solver_type in ("midpoint", "heun", "logrho"):
        solver_type = "bh2"  # diffusers' own substitution
    if solver_order < 1 or solver_type not in ("bh1", "bh2"):
        raise ValueError(
            f"uni_pc needs solver_order >= 1 and solver_type bh1 or bh2, got {solver_order}, {solver_type!r}"
        )
    predict_x0 = bool(schedule.option("predict_x0", PREDICT_X0_DEFAULT))
    lower_order_final = bool(schedule.option("lower_order_final", LOWER_ORDER_FINAL_DEFAULT))
    disabled = set(schedule.option("disable_corrector", []))

    timesteps, sigma_array = unipc_sigmas(schedule, generation)
    sigmas = torch.from_numpy(sigma_array)
    steps = len(timesteps)
    start = first_step(generation, steps)
    orders = []
    for i in range(steps):
        order = min(solver_order, steps - i) if lower_order_final else solver_order
        # warm-up: the first steps of a run (from its start; before it, as if from 0: never run) have
        # fewer outputs, as diffusers' lower_order_nums counts them
        run = i - start if i >= start else i
        orders.append(min(order, run + 1))
    # the corrector refines the sample the previous step of the run predicted: none at its first step
    corrects = [i > start and i - 1 not in disabled for i in range(steps)]
    width = solver_order - 1
    levels = [_Level.of(sigma) for sigma in sigmas]
    predictor = [
        _update(
            levels, i + 1, i, [i - k for k in range(1, orders[i])], orders[i], False, predict_x0, solver_type
        )
        for i in range(steps)
    ]
    corrector = [
        _update(levels, i, i - 1, [i - 1 - k for k in range(1, orders[i - 1])], orders[i - 1], True,
                predict_x0, solver_type)
        if corrects[i] else None
        for i in range(steps)
    ]  # fmt: skip
    updates = {"predictor": _stack_updates(predictor, width), "corrector": _stack_updates(corrector, width)}
    for kind, update in updates.items():
        values = torch.cat(
            [update.x_scale, update.m0_scale, update.res_scale, update.rhos.flatten(), update.rho_t]
        )
        # an infinite r only zeroes its term (m_k - m0) / r; a zero or NaN one spoils the sample
        if not (values.isfinite().all() and update.rks.ne(0).all() and not update.rks.isnan().any()):
            # e.g. a last step to sigma 0 with solver_type bh1, predict_x0 false or lower_order_final
            # false, or karras sigmas ending twice at sigma_min: diffusers gives NaN pictures there
            raise ValueError(
                f"uni_pc's {kind} is not finite for {steps} steps with this model's scheduler options "
                f"(solver_order={solver_order}, solver_type={solver_type}, predict_x0={predict_x0}, "
                f"lower_order_final={lower_order_final}, final_sigmas_type="
                f"{schedule.option('final_sigmas_type', FINAL_SIGMAS_TYPE_DEFAULT)}): diffusers gives NaN"
            )
    return UniPCPlan(
        timesteps=torch.from_numpy(timesteps).to(torch.float32),
        init_noise_sigma=1.0,
        sigmas=sigmas,
        alpha_t=torch.stack([level.alpha for level in levels[:steps]]),
        sigma_t=torch.stack([level.sigma for level in levels[:steps]]),
        predictor=updates["predictor"],
        corrector=updates["corrector"],
        orders=tuple(orders),
        corrects=tuple(corrects),
        solver_order=solver_order,
        predict_x0=predict_x0,
        start=start,
    )


# --- the step ---------------------------------------------------------------------------------------


def convert_output(
    prediction_type: str, predict_x0: bool, model_output: torch.Tensor, samples: torch.Tensor,
    alpha_t: torch.Tensor, sigma_t: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """`convert_model_output`: x0 (predict_x0) or epsilon from the model's output, per row."""
    if predict_x0:
        if prediction_type == "epsilon":
            return (samples - sigma_t * model_output) / alpha_t
        if prediction_type == "v_prediction":
            return alpha_t * samples - sigma_t * model_output
        return model_output  # "sample"
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * samples
    return (samples - alpha_t * model_output) / sigma_t


def _coefficient(
    rows: Sequence[RowState], kind: str, name: str, like: torch.Tensor, k: int | None = None
) -> torch.Tensor:
    """Each row's `plan.<kind>.<name>[step_index(, k)]` as (R, 1, ..., 1)."""
    values = []
    for row in rows:
        value = getattr(getattr(row.plan, kind), name)[row.step_index]
        values.append(value if k is None else value[k])
    return per_row(values, like)


def _older(rows: Sequence[RowState], back: int, fallback: torch.Tensor) -> torch.Tensor:
    """(R, C, h, w): each row's `back`-th newest history entry (1: the newest), `fallback`'s row where
    the history is shorter (its rho is 0 there)."""
    return torch.cat(
        [
            row.history[-back] if len(row.history) >= back else fallback[i : i + 1]
            for i, row in enumerate(rows)
        ]
    )


def _apply(
    rows: Sequence[RowState], kind: str, x: torch.Tensor, m0: torch.Tensor, older: list[torch.Tensor],
    m_t: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """x_t = x_scale * x - m0_scale * m0 - res_scale * residual, per row, in diffusers' order."""
    residual: torch.Tensor | int = 0
    for k, m_k in enumerate(older):
        d1 = (m_k - m0) / _coefficient(rows, kind, "rks", x, k)
        term = _coefficient(rows, kind, "rhos", x, k) * d1
        residual = term if k == 0 else residual + term
    if m_t is not None:  # the corrector's own term, rho_t * D1_t
        residual = residual + _coefficient(rows, kind, "rho_t", x) * (m_t - m0)
    x_t = _coefficient(rows, kind, "x_scale", x) * x - _coefficient(rows, kind, "m0_scale", x) * m0
    return x_t - _coefficient(rows, kind, "res_scale", x) * residual


class UniPC(Sampler):
    name = "uni_pc"

    def __init__(self) -> None:
        # (id of the schedule, steps, scheduler, first step) -> (the schedule, kept so its id stays its
        # own; plan)
        self._plans: OrderedDict[tuple[int, int, str, int], tuple[NoiseSchedule, UniPCPlan]] = OrderedDict()

    def plan(self, schedule: NoiseSchedule, generation: Generation) -> UniPCPlan:
        """The request's plan; plans are immutable, so the last PLANS_KEPT are shared."""
        key = (id(schedule), generation.steps, generation.scheduler, generation.first_step)
        cached = self._plans.get(key)
        if cached is not None and cached[0] is schedule:
            self._plans.move_to_end(key)
            return cached[1]
        plan = unipc_plan(schedule, generation)
        self._plans[key] = (schedule, plan)
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)
        return plan

    def step(
        self,
        schedule: NoiseSchedule,
        model_output: torch.Tensor,
        samples: torch.Tensor,
        rows: Sequence[RowState],
        noise: NoiseSource,
    ) -> StepResult:
        plans = [row.plan for row in rows]
        assert all(isinstance(plan, UniPCPlan) for plan in plans)
        first: UniPCPlan = plans[0]  # type: ignore[assignment]  # one model: one solver_order
        older_count = first.solver_order - 1
        alpha_t = per_row(at_step(rows, "alpha_t"), samples)
        sigma_t = per_row(at_step(rows, "sigma_t"), samples)
        converted = convert_output(
            schedule.prediction_type, first.predict_x0, model_output, samples, alpha_t, sigma_t
        )
        denoised = (
            converted
            if first.predict_x0
            else convert_output(schedule.prediction_type, True, model_output, samples, alpha_t, sigma_t)
        )

        # UniC: the sample the last step predicted, corrected with this step's output
        corrects = [row.plan.corrects[row.step_index] for row in rows]  # type: ignore[attr-defined]
        sample = samples
        if any(corrects):
            last = torch.cat(
                [
                    row.last_sample if row.last_sample is not None else samples[i : i + 1]
                    for i, row in enumerate(rows)
                ]
            )
            m0 = _older(rows, 1, converted)
            older = [_older(rows, k + 2, m0) for k in range(older_count)]
            corrected = _apply(rows, "corrector", last, m0, older, m_t=converted)
            sample = torch.where(per_row(corrects, samples) > 0, corrected, samples)

        # UniP from the corrected sample, with this step's output as the newest
        older = [_older(rows, k + 1, converted) for k in range(older_count)]
        updated = _apply(rows, "predictor", sample, converted, older)
        states = advanced(rows, history=converted, keep=first.solver_order, samples=sample)
        return StepResult(samples=updated, states=states, denoised=denoised)

    def add_noise(
        self,
        schedule: NoiseSchedule,
        original: torch.Tensor,
        noise: torch.Tensor,
        plans: Sequence[Plan],
        levels: Sequence[int],
    ) -> torch.Tensor:
        """UniPCMultistepScheduler.add_noise: alpha_t x0 + sigma_t noise at each row's sigma."""
        return sigmas_add_noise(at_levels(plans, "sigmas", levels), original, noise)
