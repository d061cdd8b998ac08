"""The loaded model: its networks, tokenizers and noise schedule, held together."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models.noise_schedule import NoiseSchedule
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL


@dataclass
class StableDiffusion:
    """UNet, KL autoencoder, CLIP text encoder(s) + tokenizer(s) and noise schedule of one checkpoint.

    SDXL has a second text encoder (OpenCLIP bigG, with its projection) and tokenizer; which family
    the model is of, and so how its prompts become the UNet's conditioning, is `models.families`'s
    business (`family_of`).

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
    # the words its training captions used (a folder's optional vocabulary.json, schemas/vocabulary.py):
    # prompts' other words are named in the job's warnings; None (real checkpoints): any word is known
    vocabulary: frozenset[str] | None = None
    # (C + 1, 3) latent channels and a bias -> RGB in [-1, 1] for live previews, fitted against this
    # model's own VAE once it is needed (models/preview.py: rgb_map)
    preview_rgb_map: torch.Tensor | None = None
    # float32 copy of the VAE without its encoder: decodes again what overflows in float16
    vae_fallback: AutoencoderKL | None = None
    # SDXL: the second text encoder (its penultimate hidden states and projected pooled output) and
    # its tokenizer (which pads with "!")
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    # SDXL pipelines' option (model_index.json): an empty negative prompt is zeros, context and pooled
    force_zeros_for_empty_prompt: bool = False

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
        """Channels of the latents the UNet denoises (an inpainting UNet takes more input channels)."""
        return self.vae.config.latent_channels

    @property
    def inpainting(self) -> bool:
        """An inpainting checkpoint (SD 1.5/2 inpainting): its UNet takes the latent, a mask and the
        masked image's latent (in_channels 9 = 4 + 1 + 4, models/img2img.py)."""
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    @property
    def context_dim(self) -> int:
        """Width of the text context the UNet attends to (768 for SD 1.x, 2048 for SDXL)."""
        return self.unet.config.cross_attention_dim[0]

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
        for text_encoder in (self.text_encoder, self.text_encoder_2):
            if text_encoder is not None:
                text_encoder.to(device=device, dtype=dtype)
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
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.vae_fallback):
            if module is not None:
                module.eval().requires_grad_(False)
        return self
