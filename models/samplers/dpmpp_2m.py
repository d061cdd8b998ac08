"""DPM-Solver++(2M) (Lu et al. 2022, https://arxiv.org/abs/2211.01095, Algorithm 2), as diffusers'
`DPMSolverMultistepScheduler` with algorithm_type "dpmsolver++" and solver_order 2: a deterministic
second-order multistep solver of the diffusion ODE in the data (x0) prediction, reusing the previous
step's x0 estimate (each row's `history`) instead of a second UNet call.

Rows: model_output and samples are (R, C, h, w) float32, each row with its own plan, step index and
previous x0 estimate. The plan and diffusers' quirks are in models/samplers/dpm_solver.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.noise_schedule import NoiseSchedule
from models.samplers.base import NoiseSource, RowState, StepResult, advanced
from models.samplers.dpm_solver import (
    DPMSolverSampler,
    columns,
    data_prediction,
    previous_predictions,
    row_mask,
    step_scalars,
)


class DPMPP2M(DPMSolverSampler):
    name = "dpmpp_2m"

    def step(
        self,
        schedule: NoiseSchedule,
        model_output: torch.Tensor,
        samples: torch.Tensor,
        rows: Sequence[RowState],
        noise: NoiseSource,
    ) -> StepResult:
        s = step_scalars(rows)
        # per-row coefficients on the CPU, as diffusers computes them; h is infinite at sigma 0, where
        # e^-h is 0 and the first-order step gives x0 itself
        exp_neg_h_minus_1 = torch.exp(-s.h) - 1.0
        d0_weight = s.alpha_t * exp_neg_h_minus_1
        # the second-order term: "midpoint" subtracts 0.5 alpha_t (e^-h - 1) D1, "heun" adds
        # alpha_t ((e^-h - 1) / h + 1) D1 (subtracting its negation is the same float operation)
        d1_weight = torch.where(s.heun, -(s.alpha_t * (exp_neg_h_minus_1 / s.h + 1.0)), 0.5 * d0_weight)
        alpha_s0, sigma_s0, ratio, d0_w, d1_w, inv_r0 = columns(
            samples, s.alpha_s0, s.sigma_s0, s.sigma_t / s.sigma_s0, d0_weight, d1_weight, s.inv_r0
        )
        second = row_mask(s.second_order, samples)

        x0 = data_prediction(schedule.prediction_type, model_output, samples, alpha_s0, sigma_s0)
        # D0 = x0_i, D1 = (x0_i - x0_{i-1}) / r0: Algorithm 2's linear extrapolation of x0 in lambda
        d1 = inv_r0 * (x0 - previous_predictions(rows, x0))
        # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0 [- 0.5 alpha_t (e^-h - 1) D1]: first order
        # (DPM-Solver++1, DDIM in other words) where the row's plan says so, else second order
        updated = ratio * samples - d0_w * x0
        updated = torch.where(second, updated - d1_w * d1, updated)
        return StepResult(samples=updated, states=advanced(rows, history=x0, keep=1), denoised=x0)
