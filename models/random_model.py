"""Small random models in both real formats (diffusers folder, original single file), for tests.

The weights are random but seeded; the configs are small versions of the real architectures
(`models/tiny_configs.py`), and the tokenizer is the real CLIP BPE tokenizer, so every code path of
loading and sampling runs as it does on a real checkpoint, in a fraction of a second.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.configs import UNetConfig, VAEConfig
from models.loading import TOKENIZER_ASSETS
from models.single_file import diffusers_to_ldm, write_checkpoint
from models.tiny_configs import SINGLE_FILE_VARIANT, TOKENIZER_2_PAD_TOKEN, TOKENIZER_PAD_TOKEN, tiny_config
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL

_WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",  # SDXL only
}


def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Give every parameter seeded random values of a sensible scale (no zeros that hide bugs)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                fan_in = math.prod(param.shape[1:])
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def random_weights(
    configs: dict[str, dict[str, Any]], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded random weights, in diffusers naming, for the networks `configs` describes (with a
    "text_encoder_2" config: SDXL's second text encoder too)."""
    modules: dict[str, nn.Module] = {
        "unet": UNet2DConditionModel(UNetConfig.from_dict(configs["unet"])),
        "vae": AutoencoderKL(VAEConfig.from_dict(configs["vae"])),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
    }
    if "text_encoder_2" in configs:
        modules["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig.from_dict(configs["text_encoder_2"])
        )
    return randomized_weights(modules, seed, dtype)


def randomized_weights(
    modules: dict[str, nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, torch.Tensor]]:
    """`modules` (ours, or diffusers' and transformers' own) randomized in turn from one seeded
    generator, as state dicts in diffusers naming."""
    generator = torch.Generator("cpu").manual_seed(seed)
    weights = {}
    for name, module in modules.items():
        randomize_(module, generator)
        weights[name] = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    # real checkpoints name the text tower's keys with the "text_model." prefix (a buffer is no weight)
    for name in ("text_encoder", "text_encoder_2"):
        if name in weights:
            weights[name] = {
                (k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k): v
                for k, v in weights[name].items()
                if not k.endswith("embeddings.position_ids")
            }
    return weights


def random_components(
    variant: str, seed: int = 0
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, torch.Tensor]]]:
    """(configs, state dicts in diffusers naming) of a tiny random model of `variant` ("sd1"/"sd2"/"sdxl")."""
    configs = tiny_config(variant)
    return configs, random_weights(configs, seed)


def write_diffusers_folder(
    out_dir: Path,
    configs: dict[str, dict[str, Any]],
    weights: dict[str, dict[str, torch.Tensor]],
    pad_token: str,
) -> Path:
    """Write a diffusers-format folder (diffusers' own from_pretrained reads it too); with a
    "text_encoder_2" config, SDXL's (StableDiffusionXLPipeline: text_encoder_2/, tokenizer_2/)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sdxl = "text_encoder_2" in configs
    scheduler = configs["scheduler"].get("_class_name", "DDIMScheduler")
    index: dict[str, Any] = {"_diffusers_version": "0.42.1", "scheduler": ["diffusers", scheduler]}
    if sdxl:
        index |= {
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    else:
        index |= {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
        }
    index |= {
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_json(out_dir / "model_index.json", dict(sorted(index.items())))
    for name, file_name in _WEIGHT_FILES.items():
        if name not in configs:
            continue
        (out_dir / name).mkdir(exist_ok=True)
        _write_json(out_dir / name / "config.json", configs[name])
        save_file(weights[name], str(out_dir / name / file_name))
    (out_dir / "scheduler").mkdir(exist_ok=True)
    _write_json(out_dir / "scheduler" / "scheduler_config.json", configs["scheduler"])
    write_tokenizer(out_dir / "tokenizer", pad_token)
    if sdxl:
        write_tokenizer(out_dir / "tokenizer_2", TOKENIZER_2_PAD_TOKEN)
    return out_dir


def write_tokenizer(out_dir: Path, pad_token: str) -> None:
    """The shipped CLIP BPE tokenizer files, with the given pad token."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for file_name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_ASSETS / file_name, out_dir / file_name)
    for file_name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = json.loads((TOKENIZER_ASSETS / file_name).read_text())
        data["pad_token"] = pad_token
        _write_json(out_dir / file_name, data)


def build_random_model(variant: str, out_dir: Path, seed: int = 0, single_file: Path | None = None) -> Path:
    """Write a tiny random `variant` model as a diffusers folder at `out_dir`, and, when asked,
    the same weights as an original single-file checkpoint at `single_file`."""
    configs, weights = random_components(variant, seed)
    write_diffusers_folder(out_dir, configs, weights, TOKENIZER_PAD_TOKEN[variant])
    if single_file is not None:
        write_checkpoint(diffusers_to_ldm(weights, configs, SINGLE_FILE_VARIANT[variant]), single_file)
    return out_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Write a tiny random SD model (diffusers folder, optional single file)."
    )
    parser.add_argument("--variant", choices=["sd1", "sd2", "sdxl", "sd1_inpainting"], default="sd1")
    parser.add_argument("--out", type=Path, required=True, help="diffusers-format folder to write")
    parser.add_argument(
        "--single-file", type=Path, help="also write an original-format .safetensors/.ckpt here"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build_random_model(args.variant, args.out, args.seed, args.single_file)


if __name__ == "__main__":
    main()
