"""Architecture configs of the embedded model, as diffusers-format config.json dicts.

`EMBEDDED` is the shipped model: 64x64 RGB images, a KL-f4 autoencoder (4 x 16 x 16 latents),
a UNet of four levels (16, 8, 4 and 2 latent pixels a side) with cross-attention at all but the
first, and a 3-layer CLIP text tower of width 64 over the full 49,408-token CLIP BPE vocabulary.
`TINY` is a seconds-to-train three-level version for tests. The scheduler is SD's, rescaled to
zero terminal SNR, with v-prediction and trailing DDIM timesteps (see `SCHEDULER`).
"""

from __future__ import annotations

import copy
from typing import Any

from models.tiny_configs import CLIP_VOCAB_SIZE

PAD_TOKEN = "<|endoftext|>"  # the tokenizer pads with EOS, as SD 1.x's does

# SD's scaled_linear betas rescaled to zero terminal SNR, v-prediction, trailing timesteps (Lin et al.
# 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891). SD's own
# schedule keeps sqrt(alpha_bar) = 0.068 of the image at t = 999: enough for a small model to read
# the layout off the initial noise and ignore the caption's position words (measured: trained 3000
# steps on it, a model put the shape wherever the seed said, for all nine positions). At zero
# terminal SNR the first step sees pure noise and must take the picture from the caption.
SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "rescale_betas_zero_snr": True,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}

EMBEDDED: dict[str, dict[str, Any]] = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        # the 2x2 level: there every cell is a corner and its zero padding says which, so the
        # caption's position words can be turned into places (with three levels, 4x4 at the
        # bottom, a model trained the same way placed shapes at 21%; with four, 94% by 1,500 steps)
        "block_out_channels": [32, 64, 128, 128],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", *["CrossAttnDownBlock2D"] * 3],
        "up_block_types": [*["CrossAttnUpBlock2D"] * 3, "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": 64,
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
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "act_fn": "silu",
        "sample_size": 64,
        "mid_block_add_attention": False,
        "scaling_factor": 1.0,  # replaced by 1 / (latent std) after the autoencoder is trained
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 64,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    },
    "scheduler": SCHEDULER,
}

TINY: dict[str, dict[str, Any]] = copy.deepcopy(EMBEDDED)
TINY["unet"].update(
    {
        "block_out_channels": [16, 16, 32],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "cross_attention_dim": 16,
    }
)
TINY["vae"].update({"block_out_channels": [8, 8, 16], "norm_num_groups": 4})
TINY["text_encoder"].update(
    {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "projection_dim": 16}
)

ARCHITECTURES = {"embedded": EMBEDDED, "tiny": TINY}


def architecture(name: str) -> dict[str, dict[str, Any]]:
    """A deep copy of the named config set ("embedded" or "tiny")."""
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {name!r}")
    return copy.deepcopy(ARCHITECTURES[name])
