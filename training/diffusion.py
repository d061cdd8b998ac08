"""Stage 2: train the UNet and the CLIP text encoder together, from scratch, on VAE latents.

Each step draws a batch from a fixed pool of encoded training images (a fresh posterior sample
each time, scaled by the VAE's scaling factor), a fresh caption per image
(`training.captions.describe`: free word order, fillers, sometimes no background), drops
`uncond_prob` of the captions to "" (classifier-free guidance), noises the latents at random
timesteps of the model's zero-terminal-SNR schedule (`training.architecture.SCHEDULER`) and
regresses v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * latents (v-prediction), weighted by
`timestep_weights` (min-SNR-gamma, Hang et al. 2023, https://arxiv.org/abs/2303.09556) and, per
latent pixel, by `pixel_weights` (the shape's pixels count more). EMA copies of both networks are
what gets saved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.configs import UNetConfig
from models.samplers.ddim import DDIMSchedule
from models.text import PromptEncoder
from models.unet import UNet2DConditionModel
from training.captions import describe
from training.schedule import EMA, warmup_cosine
from training.shapes import COLOUR_NAMES, POSITION_NAMES, SHAPES, Scene, shape_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusionRecipe:
    """Hyperparameters of stage 2."""

    # 7,500 (the model before free-phrasing captions had 6,000): the text encoder has many more
    # phrasings to learn, and the whole run must stay within 90 minutes on a 2-core machine
    steps: int = 7500
    batch_size: int = 32
    lr: float = 1e-3
    text_lr_scale: float = 3.0  # the text encoder learns at lr * text_lr_scale
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    uncond_prob: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    snr_gamma: float = 5.0  # min-SNR cap of the weight of nearly clean latents (`timestep_weights`)
    # loss weight of the latent pixels a shape covers, relative to the background's (see
    # `pixel_weights`); the shipped model was trained with 1 (uniform). With the text encoder's
    # auxiliary loss, 4 learned shapes faster (71% against 35% right at 1,500 steps) but ended lower
    # (91.7% against 95.3% on 192 held-out prompts at 6,000 steps)
    shape_weight: float = 1.0
    # weight of the text encoder's auxiliary loss: linear heads read the caption's colour, shape,
    # position and background off its end-of-text state (`AttributeHeads`, discarded after training).
    # Without it the jointly trained text tower lets the position words collapse (measured on a
    # model trained with 0: "top left" vs "bottom right" moved its output by 0.04 where a colour
    # moved it by 5) and no UNet can place a shape it is not told about.
    text_aux_weight: float = 1.0
    # steps of `text_pretrain_batch` captions on which the text encoder learns the auxiliary loss
    # alone before the UNet joins (`pretrain_text_encoder`): free phrasing moves each attribute's
    # words around, and a UNet trained against a text tower that has not yet sorted them out
    # learns shapes late (the run without it: 68% at 4,000 steps, 86% at 8,000)
    text_pretrain_steps: int = 500
    text_pretrain_batch: int = 64
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
    """Token ids of captions exactly as inference builds them ([BOS] ids [EOS] pad..., 77).

    Not cached: the caption generator rarely repeats itself (about 86% of 100,000 captions are
    unique), and tokenizing takes ~0.2 ms a caption, about a minute of a full run."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
        self.prompts = PromptEncoder(tokenizer, text_encoder)

    def __call__(self, captions: list[str]) -> torch.Tensor:  # -> (B, 77) int64
        rows = []
        for text in captions:
            chunks = self.prompts.chunks(text)
            if len(chunks) != 1:
                raise ValueError(f"caption {text!r} is longer than one 75-token chunk")
            rows.append(chunks[0])
        return torch.tensor(rows, dtype=torch.long)


class AttributeHeads(nn.Module):
    """Linear classifiers of a caption's colour, shape, position and background from the text
    encoder's pooled (end-of-text) state: the auxiliary loss of `DiffusionRecipe.text_aux_weight`."""

    ATTRIBUTES = (
        ("colour", COLOUR_NAMES),
        ("shape", SHAPES),
        ("position", POSITION_NAMES),
        ("background", COLOUR_NAMES),
    )

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_size, len(names)) for _, names in self.ATTRIBUTES)

    def loss(
        self, pooled: torch.Tensor, scenes: list[Scene | None], names_background: list[bool] | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy over the attributes, on the rows whose caption was kept (not ""); the
        background's only on the rows whose caption names it (`names_background`, default all)."""
        rows = [i for i, scene in enumerate(scenes) if scene is not None]
        if not rows:
            return pooled.sum() * 0.0
        losses = []
        for head, (attribute, names) in zip(self.heads, self.ATTRIBUTES, strict=True):
            named = rows
            if attribute == "background" and names_background is not None:
                named = [i for i in rows if names_background[i]]
                if not named:
                    continue
            target = torch.tensor([names.index(getattr(scenes[i], attribute)) for i in named])
            losses.append(F.cross_entropy(head(pooled[named]), target))
        return torch.stack(losses).mean()


def timestep_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Loss weight of each timestep's v-prediction MSE, (T,) float32: min(1, gamma / SNR).

    In image units the v loss is (1 + SNR) times the error of the predicted clean latent: full
    weight where the picture is still mostly noise (at SNR 0, t = 999 of a zero-terminal-SNR
    schedule, the model predicts the whole picture from the caption alone), and an SNR-fold
    weight on nearly clean latents, which this caps at gamma (min-SNR-gamma, Hang et al. 2023).
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(gamma / snr, max=1.0)  # SNR 0 gives gamma / 0 = inf, clamped to 1


def pixel_weights(scenes: list[Scene], latent_size: int, shape_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights (N, 1, h, w), mean 1 per image: `shape_weight` where the shape is.

    A shape covers about 8% of a picture, so with uniform weights the background colour is most
    of the loss and the model learns it first and the shape's place last (measured: after 3000
    steps every model put the shape where the seed's noise suggested, whatever the caption said).
    Weighting the shape's pixels puts about 40% of the loss on them.
    """
    masks = torch.from_numpy(np.stack([shape_mask(s, supersample=1) for s in scenes]))[
        :, None
    ]  # (N, 1, 64, 64)
    coverage = F.avg_pool2d(masks, kernel_size=masks.shape[-1] // latent_size)  # (N, 1, h, w)
    weights = 1.0 + (shape_weight - 1.0) * coverage
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


def pretrain_text_encoder(
    text_encoder: CLIPTextModel,
    heads: AttributeHeads,
    tokens: CaptionTokens,
    scenes: list[Scene],
    recipe: DiffusionRecipe,
    rng: np.random.Generator,
) -> float:
    """Train the text encoder and `heads` on the auxiliary loss alone (captions of random
    training scenes); returns the mean loss of the last `log_every` steps."""
    params = [*text_encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=recipe.lr * recipe.text_lr_scale, weight_decay=recipe.weight_decay, fused=True
    )
    warmup = min(recipe.warmup_steps, max(recipe.text_pretrain_steps // 10, 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, recipe.text_pretrain_steps, warmup)
    )
    window: list[float] = []
    for step in range(recipe.text_pretrain_steps):
        batch = [scenes[i] for i in rng.integers(len(scenes), size=recipe.text_pretrain_batch)]
        described = [describe(scene, rng) for scene in batch]
        encoded = text_encoder(input_ids=tokens([d.text for d in described]))
        loss = heads.loss(encoded.pooler_output, list(batch), [d.names_background for d in described])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        window = [*window[-(recipe.log_every - 1) :], loss.item()]
        if (step + 1) % (recipe.log_every * 10) == 0 or step + 1 == recipe.text_pretrain_steps:
            logger.info(
                "text pretraining step %d/%d loss %.4f", step + 1, recipe.text_pretrain_steps, np.mean(window)
            )
    return float(np.mean(window)) if window else float("nan")


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
    if schedule.prediction_type != "v_prediction":
        raise ValueError(f"training supports v_prediction only, got {schedule.prediction_type!r}")
    alphas_cumprod = schedule.alphas_cumprod  # (1000,)
    # half the weighting by sampling, half by the loss: timesteps are drawn with probability
    # proportional to sqrt(weight) and their loss is multiplied by sqrt(weight) (normalised to mean
    # 1 under that draw), so the expected loss is the weighted one and compute follows the weight
    root_weights = timestep_weights(alphas_cumprod, recipe.snr_gamma).sqrt()
    timestep_probs = root_weights / root_weights.sum()
    loss_weights = root_weights / (timestep_probs * root_weights).sum()  # (T,)
    tokens = CaptionTokens(tokenizer, text_encoder)
    weights_per_pixel = pixel_weights(pool.scenes, pool.means.shape[-1], recipe.shape_weight)

    # made only when used, so a run without it draws the same random numbers as before
    heads = AttributeHeads(text_encoder.config.hidden_size) if recipe.text_aux_weight > 0 else None
    rng = np.random.default_rng(seed)  # batches, captions, dropout
    if heads is not None and recipe.text_pretrain_steps > 0:
        pretrain_text_encoder(text_encoder, heads, tokens, pool.scenes, recipe, rng)
    text_params = [*text_encoder.parameters(), *(heads.parameters() if heads is not None else [])]
    params = [*unet.parameters(), *text_params]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters())},
            {"params": text_params, "lr": recipe.lr * recipe.text_lr_scale},
        ],
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        fused=True,  # the per-tensor loop costs ~0.25 s a step on one CPU thread
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, recipe.steps, recipe.warmup_steps)
    )
    ema_unet, ema_text = EMA(unet, recipe.ema_decay), EMA(text_encoder, recipe.ema_decay)

    noise_gen = torch.Generator().manual_seed(seed + 1)  # posterior samples, timesteps, noise
    start = time.perf_counter()
    window: list[float] = []
    for step in range(recipe.steps):
        index = torch.from_numpy(rng.integers(len(pool.scenes), size=recipe.batch_size))
        kept = [None if rng.random() < recipe.uncond_prob else pool.scenes[i] for i in index.tolist()]
        described = [None if scene is None else describe(scene, rng) for scene in kept]
        captions = ["" if d is None else d.text for d in described]
        mean, std = pool.means[index], pool.stds[index]  # (B, C, h, w)
        latents = (mean + std * torch.randn(mean.shape, generator=noise_gen)) * pool.scaling_factor
        timesteps = torch.multinomial(
            timestep_probs, recipe.batch_size, replacement=True, generator=noise_gen
        )
        noise = torch.randn(latents.shape, generator=noise_gen)
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise  # q(x_t | x_0)
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # v (Salimans & Ho 2022)

        encoded = text_encoder(input_ids=tokens(captions))
        context = encoded.last_hidden_state  # (B, 77, D)
        prediction = unet(noisy, timesteps, context)  # (B, C, h, w)
        per_row = (weights_per_pixel[index] * (prediction - target).pow(2)).mean(dim=(1, 2, 3))  # (B,)
        loss = (loss_weights[timesteps] * per_row).mean()
        if heads is not None:
            loss = loss + recipe.text_aux_weight * heads.loss(
                encoded.pooler_output, kept, [d is not None and d.names_background for d in described]
            )

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
