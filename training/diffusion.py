"""Stage 2: train the UNet and the CLIP text encoder together, from scratch, on VAE latents.

Each step draws a batch from a fixed pool of encoded training images (a fresh posterior sample
each time, scaled by the VAE's scaling factor), a fresh caption per image (random template), drops
`uncond_prob` of the captions to "" (classifier-free guidance), noises the latents at uniform
timesteps of SD's schedule and regresses the noise (epsilon prediction). Timesteps are drawn in
proportion to `timestep_weights`: little compute on nearly clean latents (min-SNR-gamma, Hang et al.
2023, https://arxiv.org/abs/2303.09556), more on very noisy ones, where the caption alone decides
the picture. EMA copies of both networks are what gets saved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.configs import UNetConfig
from models.ddim import DDIMSchedule
from models.text import PromptEncoder
from models.unet import UNet2DConditionModel
from training.schedule import EMA, warmup_cosine
from training.shapes import Scene, caption

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusionRecipe:
    """Hyperparameters of stage 2."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    text_lr_scale: float = 3.0  # the text encoder learns at lr * text_lr_scale
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    uncond_prob: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    snr_gamma: float = 5.0  # clip of the timestep weights at both ends (see `timestep_weights`)
    log_every: int = 50


@dataclass(frozen=True)
class LatentPool:
    """Encoded training images: posterior mean and std (N, C, h, w) and the scenes they show."""

    means: torch.Tensor
    stds: torch.Tensor
    scenes: list[Scene]
    scaling_factor: float


@dataclass(frozen=True)
class DiffusionResult:
    unet: UNet2DConditionModel  # the EMA weights
    text_encoder: CLIPTextModel  # the EMA weights
    final_loss: float  # mean weighted loss over the last `log_every` steps
    seconds: float


class CaptionTokens:
    """Token ids of captions exactly as inference builds them ([BOS] ids [EOS] pad..., 77), cached."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
        self.prompts = PromptEncoder(tokenizer, text_encoder)
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:  # -> (B, 77) int64
        for text in captions:
            if text not in self.cache:
                chunks = self.prompts.chunks(text)
                if len(chunks) != 1:
                    raise ValueError(f"caption {text!r} is longer than one 75-token chunk")
                self.cache[text] = chunks[0]
        return torch.tensor([self.cache[text] for text in captions], dtype=torch.long)


def timestep_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Weight of each timestep's epsilon loss, (T,) float32: min(SNR, gamma) / SNR * min(1 + 1/SNR, gamma).

    The first factor is min-SNR-gamma (Hang et al. 2023): nearly clean latents weigh little. The
    second is the v-prediction / EDM weight 1 + 1/SNR (in epsilon units), clipped at gamma: very
    noisy latents weigh more, because an epsilon error there is a 1/sqrt(SNR) times larger error
    in the predicted image, and that is where only the caption can tell where the shape goes (SD's
    schedule leaves some signal at t = 999, enough for a model to guess the layout from the noise
    instead, unless those steps count).
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(snr, max=gamma) / snr * torch.clamp(1 + 1 / snr, max=gamma)


def train_diffusion(
    configs: dict[str, dict[str, Any]],
    tokenizer: CLIPTokenizer,
    pool: LatentPool,
    recipe: DiffusionRecipe,
    seed: int,
    on_checkpoint: Callable[[int, UNet2DConditionModel, CLIPTextModel], None] | None = None,
    checkpoint_every: int = 0,
) -> DiffusionResult:
    """Train a UNet and a CLIP text encoder built from `configs` ("unet", "text_encoder", "scheduler").

    `on_checkpoint(step, ema_unet, ema_text_encoder)`, when given, is called every `checkpoint_every`
    steps (for learning curves; it must not change the modules).
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(UNetConfig.from_dict(configs["unet"])).train()
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])).train()
    schedule = DDIMSchedule.from_config(configs["scheduler"])
    if schedule.prediction_type != "epsilon":
        raise ValueError(f"training supports epsilon prediction only, got {schedule.prediction_type!r}")
    alphas_cumprod = schedule.alphas_cumprod  # (1000,)
    # timesteps are drawn in proportion to their loss weight (importance sampling: the same
    # expected loss as weighting uniform draws, with the compute spent where the weight is)
    timestep_probs = timestep_weights(alphas_cumprod, recipe.snr_gamma)
    tokens = CaptionTokens(tokenizer, text_encoder)

    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters())},
            {"params": list(text_encoder.parameters()), "lr": recipe.lr * recipe.text_lr_scale},
        ],
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, recipe.steps, recipe.warmup_steps)
    )
    ema_unet, ema_text = EMA(unet, recipe.ema_decay), EMA(text_encoder, recipe.ema_decay)

    rng = np.random.default_rng(seed)  # batches, captions, dropout
    noise_gen = torch.Generator().manual_seed(seed + 1)  # posterior samples, timesteps, noise
    start = time.perf_counter()
    window: list[float] = []
    for step in range(recipe.steps):
        index = torch.from_numpy(rng.integers(len(pool.scenes), size=recipe.batch_size))
        captions = [
            "" if rng.random() < recipe.uncond_prob else caption(pool.scenes[i], rng) for i in index.tolist()
        ]
        mean, std = pool.means[index], pool.stds[index]  # (B, C, h, w)
        latents = (mean + std * torch.randn(mean.shape, generator=noise_gen)) * pool.scaling_factor
        timesteps = torch.multinomial(
            timestep_probs, recipe.batch_size, replacement=True, generator=noise_gen
        )
        noise = torch.randn(latents.shape, generator=noise_gen)
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise  # q(x_t | x_0)

        context = text_encoder(input_ids=tokens(captions)).last_hidden_state  # (B, 77, D)
        prediction = unet(noisy, timesteps, context)  # (B, C, h, w)
        loss = (prediction - noise).pow(2).mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)

        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(step + 1, ema_unet.module, ema_text.module)
        window = [*window[-(recipe.log_every - 1) :], loss.item()]
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
            logger.info(
                "diffusion step %d/%d loss %.4f lr %.2e (%.0f s)",
                step + 1,
                recipe.steps,
                float(np.mean(window)),
                scheduler.get_last_lr()[0],
                time.perf_counter() - start,
            )
    return DiffusionResult(
        unet=ema_unet.module,
        text_encoder=ema_text.module,
        final_loss=float(np.mean(window)),
        seconds=time.perf_counter() - start,
    )
