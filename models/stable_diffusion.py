"""The loaded model: the three networks, the tokenizer and the noise schedule, held together."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from models.noise_schedule import NoiseSchedule
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL


@dataclass
class StableDiffusion:
    """UNet, KL autoencoder, CLIP text encoder + tokenizer and noise schedule of one checkpoint.

    The VAE may run in another dtype than the UNet (e.g. float32 decode beside a float16 UNet). A
    float16 VAE may keep a float32 copy of its decoding side (`vae_fallback`, see
    `keep_float32_decoder`) for the rare latents whose float16 decode overflows.
    """

    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    # settings the model's authors recommend (a folder's optional defaults.json): steps,
    # guidance_scale, sampler, scheduler
    recommended: dict[str, Any] = field(default_factory=dict)
    # float32 copy of the VAE without its encoder: decodes again what overflows in float16
    vae_fallback: AutoencoderKL | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's (and text encoder's) compute dtype."""
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at: the UNet's sample size in pixels."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return width * self.vae_scale_factor, height * self.vae_scale_factor

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None,
    ) -> StableDiffusion:
        """Move every network (in place); the VAE takes `vae_dtype` when given, else `dtype`. The
        float32 fallback decoder, if kept, only moves: it stays float32."""
        self.unet.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=vae_dtype or dtype)
        if self.vae_fallback is not None:
            self.vae_fallback.to(device=device)
        return self

    def keep_float32_decoder(self) -> None:
        """Keep a float32 copy of the VAE's decoding side (post-quant conv and decoder, ~200 MB for
        SD) as `vae_fallback`, for latents whose half-precision decode overflows to inf/NaN. Call
        it while the VAE is still float32 (before `to(vae_dtype=float16)`): a copy made from
        float16 weights would carry their rounding."""
        if self.vae_dtype != torch.float32:
            raise ValueError(f"the float32 fallback must be copied from a float32 VAE, not {self.vae_dtype}")
        fallback = copy.deepcopy(self.vae)
        fallback.encoder = None  # decoding only: the encoder's ~34M parameters are not kept
        fallback.quant_conv = None
        self.vae_fallback = fallback.eval().requires_grad_(False)

    def eval(self) -> StableDiffusion:
        for module in (self.unet, self.vae, self.text_encoder, self.vae_fallback):
            if module is not None:
                module.eval().requires_grad_(False)
        return self
