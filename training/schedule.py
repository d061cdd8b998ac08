"""Optimisation helpers shared by both training stages: seeding, LR schedule, EMA, images as tensors."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU) so a run is a function of its seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.05) -> float:
    """LR multiplier: linear warmup from 0 over `warmup_steps`, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's parameters (and a copy of its buffers).

    The decay ramps up as `min(decay, (1 + n) / (10 + n))` after n updates, so early averages are
    not dominated by the random initialisation.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # one multi-tensor op: a loop over ~1,000 tensors costs ~20 ms a step on one CPU thread
        torch._foreach_lerp_(
            list(self.module.parameters()), [p.detach() for p in module.parameters()], 1 - decay
        )


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the autoencoder's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
