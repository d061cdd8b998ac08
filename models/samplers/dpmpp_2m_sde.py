"""SDE-DPM-Solver++(2M) (Lu et al. 2022, https://arxiv.org/abs/2211.01095), as diffusers'
`DPMSolverMultistepScheduler` with algorithm_type "sde-dpmsolver++" and solver_order 2: DPM-Solver++(2M)
for the diffusion SDE, which forgets part of the sample at each step and adds fresh noise from the
image's own generator in its place.

diffusers draws that noise at every step, the last one included (where its weight sigma_t is 0), and
so do we, or the generator's stream would differ from the next draw on. The plan and diffusers'
other quirks are in models/samplers/dpm_solver.py.
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


class DPMPP2MSDE(DPMSolverSampler):
    name = "dpmpp_2m_sde"

    def step(
        self,
        schedule: NoiseSchedule,
        model_output: torch.Tensor,
        samples: torch.Tensor,
        rows: Sequence[RowState],
        noise: NoiseSource,
    ) -> StepResult:
        s = step_scalars(rows)
        # per-row coefficients on the CPU, as diffusers computes them (h is infinite at sigma 0)
        forget = 1 - torch.exp(-2.0 * s.h)  # 1 - e^-2h: the share of the sample replaced by noise
        d0_weight = s.alpha_t * forget
        # "midpoint": + 0.5 * alpha_t (1 - e^-2h) D1; "heun": + alpha_t ((1 - e^-2h) / (-2h) + 1) D1
        d1_weight = torch.where(s.heun, s.alpha_t * (forget / (-2.0 * s.h) + 1.0), 0.5 * d0_weight)
        noise_weight = s.sigma_t * torch.sqrt(forget)
        alpha_s0, sigma_s0, ratio, d0_w, d1_w, inv_r0, noise_w = columns(
            samples,
            s.alpha_s0,
            s.sigma_s0,
            s.sigma_t / s.sigma_s0 * torch.exp(-s.h),
            d0_weight,
            d1_weight,
            s.inv_r0,
            noise_weight,
        )
        second = row_mask(s.second_order, samples)

        x0 = data_prediction(schedule.prediction_type, model_output, samples, alpha_s0, sigma_s0)
        fresh = noise([True] * len(rows))  # every step, the last one included, as diffusers
        d1 = inv_r0 * (x0 - previous_predictions(rows, x0))
        # x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) (D0 [+ D1 / 2]) + sigma_t sqrt(1 - e^-2h) z
        updated = ratio * samples + d0_w * x0
        updated = torch.where(second, updated + d1_w * d1, updated)
        updated = updated + noise_w * fresh
        return StepResult(samples=updated, states=advanced(rows, history=x0, keep=1), denoised=x0)
