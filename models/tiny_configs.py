"""Small configurations of the real SD architectures, for tests and for random demo models.

Each is a dict of diffusers-format config.json contents, keyed by component folder name, so the
same dicts build our modules, diffusers' modules and a diffusers-format folder on disk.
"SD1" is the SD 1.x variant (conv proj_in/out, one head count, CLIP ViT-L style text tower);
"SD2" the SD 2.x variant (linear proj_in/out, per-block head counts, upcast attention, gelu text
tower, v-prediction); "SDXL" SDXL base's (two text encoders, added conditioning, per-level depth).
"""

from __future__ import annotations

import copy
from typing import Any

CLIP_VOCAB_SIZE = 49408  # the real CLIP BPE tokenizer ships with the project

_SCHEDULER_BASE: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

TINY_SD1: dict[str, dict[str, Any]] = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 16,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": False,
        "upcast_attention": False,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [16, 16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "act_fn": "silu",
        "sample_size": 64,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    },
    "scheduler": {**_SCHEDULER_BASE, "prediction_type": "epsilon"},
}

TINY_SD2: dict[str, dict[str, Any]] = copy.deepcopy(TINY_SD1)
TINY_SD2["unet"].update(
    {
        "cross_attention_dim": 48,
        "attention_head_dim": [2, 4, 4],
        "use_linear_projection": True,
        "upcast_attention": True,
    }
)
TINY_SD2["text_encoder"].update({"hidden_size": 48, "num_attention_heads": 4, "hidden_act": "gelu"})
TINY_SD2["scheduler"].update({"prediction_type": "v_prediction"})

# SDXL's architecture, small: two text encoders of different widths (CLIP ViT-L style, 32; OpenCLIP
# bigG style with a projection, 48 -> 24) whose penultimate states sit side by side (80), the
# "text_time" added conditioning (24 pooled + 6 x 8 size numbers = 72), more than one transformer
# layer per level (1, 2: the mid block takes the last), SDXL's block types, VAE scale and scheduler.
TINY_SDXL: dict[str, dict[str, Any]] = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "transformer_layers_per_block": [1, 2],
        "cross_attention_dim": 80,
        "attention_head_dim": [2, 4],
        "norm_num_groups": 16,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": True,
        "upcast_attention": None,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 72,
    },
    "vae": {**TINY_SD1["vae"], "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": {**TINY_SD1["text_encoder"]},
    "text_encoder_2": {
        **TINY_SD1["text_encoder"],
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "hidden_act": "gelu",
        "projection_dim": 24,
        # as SDXL's real config: the pooled token is found as the largest id (the first EOS)
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "scheduler": {
        **_SCHEDULER_BASE,
        "_class_name": "EulerDiscreteScheduler",
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    },
}
TINY_SDXL["scheduler"].pop("clip_sample")

# SD 1.5-inpainting's architecture: SD 1.x's with a UNet taking 9 input channels (the latent, the mask
# and the masked image's latent)
TINY_SD1_INPAINTING: dict[str, dict[str, Any]] = copy.deepcopy(TINY_SD1)
TINY_SD1_INPAINTING["unet"]["in_channels"] = 9

# pad token of the tokenizer each variant ships with (SD 2.x pads with "!", id 0); SDXL's second
# tokenizer (tokenizer_2) pads with "!" too
TOKENIZER_PAD_TOKEN = {
    "sd1": "<|endoftext|>",
    "sd2": "!",
    "sdxl": "<|endoftext|>",
    "sd1_inpainting": "<|endoftext|>",
}
TOKENIZER_2_PAD_TOKEN = "!"
# the original single-file layout of each variant (an inpainting UNet's keys are SD 1.x's)
SINGLE_FILE_VARIANT = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sd1_inpainting": "sd1"}


def tiny_config(variant: str) -> dict[str, dict[str, Any]]:
    """A deep copy of the tiny config for "sd1", "sd2", "sdxl" or "sd1_inpainting"."""
    configs = {"sd1": TINY_SD1, "sd2": TINY_SD2, "sdxl": TINY_SDXL, "sd1_inpainting": TINY_SD1_INPAINTING}
    if variant not in configs:
        raise ValueError(f"variant must be one of {sorted(configs)}, got {variant!r}")
    return copy.deepcopy(configs[variant])
