"""Stage 1: train the KL autoencoder on rendered shape images, then measure its latent scale.

Loss: L1 + MSE reconstruction of a posterior sample, plus `kl_weight` times the KL divergence of the
diagonal Gaussian posterior from N(0, I) (both averaged per element), as the LDM paper's KL-f
autoencoders (without their perceptual and adversarial terms: flat-coloured shapes do not need
them). Training images are rendered on the fly from the seed, never from a held-out triple.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.configs import VAEConfig
from models.vae import AutoencoderKL
from training.schedule import images_to_tensor, warmup_cosine
from training.shapes import make_dataset, shape_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderRecipe:
    """Hyperparameters of stage 1."""

    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    kl_weight: float = 1e-6
    shape_weight: float = 10.0  # loss weight of shape pixels (a shape covers ~5% of an image)
    initial_logvar: float = -6.0  # start with a narrow posterior: early noise only slows learning
    log_every: int = 50


@dataclass(frozen=True)
class AutoencoderResult:
    vae: AutoencoderKL
    final_loss: float  # mean total loss over the last `log_every` steps
    final_l1: float  # mean absolute reconstruction error over the same steps, [-1, 1] units
    seconds: float


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over every element."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def train_autoencoder(config: dict[str, Any], recipe: AutoencoderRecipe, seed: int) -> AutoencoderResult:
    """Train an AutoencoderKL built from the diffusers config dict `config` from scratch."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAEConfig.from_dict(config)).train()
    if vae.quant_conv is not None:
        with torch.no_grad():  # the second half of the quant conv's outputs is the log-variance
            vae.quant_conv.bias[vae.config.latent_channels :] = recipe.initial_logvar
    optimizer = torch.optim.AdamW(
        vae.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, recipe.steps, recipe.warmup_steps)
    )
    data_seeds = np.random.default_rng(seed).integers(2**63, size=recipe.steps)
    noise = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    window: list[tuple[float, float]] = []
    for step in range(recipe.steps):
        images, scenes = make_dataset(recipe.batch_size, seed=int(data_seeds[step]))
        x = images_to_tensor(images)  # (B, 3, 64, 64)
        coverage = torch.from_numpy(np.stack([shape_mask(s) for s in scenes]))[:, None]  # (B, 1, 64, 64)
        weight = 1.0 + (recipe.shape_weight - 1.0) * coverage
        weight = weight / weight.mean()
        mean, logvar = vae.encode(x)  # (B, 4, 16, 16) each
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=noise)
        reconstruction = vae.decode(z)
        error = reconstruction - x
        l1 = error.abs().mean()
        reconstruction_loss = (weight * (error.abs() + error.pow(2))).mean()
        loss = reconstruction_loss + recipe.kl_weight * kl_divergence(mean, logvar)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window = [*window[-(recipe.log_every - 1) :], (loss.item(), l1.item())]
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
            logger.info(
                "vae step %d/%d loss %.4f l1 %.4f posterior std %.3f (%.0f s)",
                step + 1,
                recipe.steps,
                np.mean([w[0] for w in window]),
                np.mean([w[1] for w in window]),
                (0.5 * logvar).exp().mean().item(),
                time.perf_counter() - start,
            )
    return AutoencoderResult(
        vae=vae.eval().requires_grad_(False),
        final_loss=float(np.mean([w[0] for w in window])),
        final_l1=float(np.mean([w[1] for w in window])),
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def encode_posteriors(
    vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the posterior of each image (N, 64, 64, 3) uint8: each (N, C, h, w) float32."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        mean, logvar = vae.encode(images_to_tensor(images[start : start + batch_size]))
        means.append(mean)
        stds.append((0.5 * logvar).exp())
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(means: torch.Tensor, stds: torch.Tensor, seed: int) -> float:
    """1 / std of posterior samples, as SD's 0.18215 was measured: scaled latents have unit variance."""
    noise = torch.randn(means.shape, generator=torch.Generator().manual_seed(seed))
    return float(1.0 / (means + stds * noise).std())
