"""Tiny random SDXL-architecture models built with diffusers' and transformers' own classes (not
ours): the key layout and shapes of the test models are the reference's, so loading them checks our
architecture instead of assuming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.random_model import randomized_weights, write_diffusers_folder
from models.single_file import diffusers_to_ldm, write_checkpoint
from models.tiny_configs import TOKENIZER_PAD_TOKEN, tiny_config


def diffusers_modules(configs: dict[str, dict[str, Any]]) -> dict[str, torch.nn.Module]:
    """diffusers' UNet and VAE, transformers' two CLIP text models, for SDXL `configs`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def public(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    return {
        "unet": UNet2DConditionModel(**public(configs["unet"])),
        "vae": AutoencoderKL(**public(configs["vae"])),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
    }


def build_sdxl_model(out_dir: Path, seed: int = 0, single_file: Path | None = None) -> Path:
    """A tiny random SDXL diffusers folder at `out_dir` (and, when asked, the same weights as an
    original single file), its weights drawn in diffusers' modules."""
    configs = tiny_config("sdxl")
    weights = randomized_weights(diffusers_modules(configs), seed)
    write_diffusers_folder(out_dir, configs, weights, TOKENIZER_PAD_TOKEN["sdxl"])
    if single_file is not None:
        write_checkpoint(diffusers_to_ldm(weights, configs, "sdxl"), single_file)
    return out_dir
