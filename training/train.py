"""Train the embedded model from scratch and write it as a diffusers-format folder.

    python -m training.train --out models/embedded_model --seed 0

Stage 1 trains the KL autoencoder (`training.autoencoder`) and measures its scaling factor; the
latent pool (posteriors of `pool_size` rendered training images) is encoded once; stage 2 trains
the UNet and the CLIP text encoder together (`training.diffusion`). The folder gets every weight
in float16 safetensors (the loader casts to its load dtype), the real CLIP BPE tokenizer,
SD's DDIM scheduler config, `defaults.json` (the sampling defaults the model is measured at),
`vocabulary.json` (every word the training captions use, sorted: `training.captions.vocabulary`,
words as `schemas.vocabulary.words_of` splits text, so a worker can name the words
of a prompt the model never saw) and `training_summary.json` (recipe, losses, wall and CPU
times). A run is a function of `--seed` and the thread count (`--threads`, default 1: on a
2-core machine shared with other work, two OpenMP threads spin-wait on each other and run several
times slower than one).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.loading import TOKENIZER_ASSETS, load_tokenizer
from models.random_model import write_diffusers_folder
from schemas.vocabulary import VOCABULARY_FILE
from training.architecture import ARCHITECTURES, PAD_TOKEN, architecture
from training.autoencoder import (
    AutoencoderRecipe,
    encode_posteriors,
    latent_scaling_factor,
    train_autoencoder,
)
from training.captions import vocabulary
from training.diffusion import DiffusionRecipe, LatentPool, train_diffusion
from training.schedule import seed_everything
from training.shapes import make_dataset

logger = logging.getLogger("training.train")

# The sampling settings the model card's scores are measured at (written to defaults.json).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 5.0


def float16_weights(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The module's state dict in float16 (floating tensors only), contiguous, keys prefixed."""
    return {
        prefix + key: (value.half() if value.is_floating_point() else value).contiguous()
        for key, value in module.state_dict().items()
    }


def text_encoder_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Text-encoder weights named as real checkpoints name them (`text_model.` prefix)."""
    weights = float16_weights(module)
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in weights.items()}


def save_model(
    out_dir: Path,
    configs: dict[str, dict[str, Any]],
    unet: nn.Module,
    text_encoder: nn.Module,
    vae: nn.Module,
) -> None:
    """Write a diffusers-format model folder (float16 safetensors) with its defaults.json and
    vocabulary.json."""
    weights = {
        "unet": float16_weights(unet),
        "vae": float16_weights(vae),
        "text_encoder": text_encoder_weights(text_encoder),
    }
    write_diffusers_folder(out_dir, configs, weights, PAD_TOKEN)
    defaults = {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE, "width": 64, "height": 64}
    (out_dir / "defaults.json").write_text(json.dumps(defaults, indent=2) + "\n", encoding="utf-8")
    (out_dir / VOCABULARY_FILE).write_text(json.dumps(vocabulary(), indent=0) + "\n", encoding="utf-8")


def train(
    out_dir: Path,
    seed: int,
    arch: str,
    vae_recipe: AutoencoderRecipe,
    diffusion_recipe: DiffusionRecipe,
    pool_size: int,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """Run both stages and write the model folder; returns the training summary.

    With `checkpoint_every`, the EMA weights are also written every that many diffusion steps
    to `out_dir/checkpoints/step-N` (complete model folders, for learning curves).
    """
    seed_everything(seed)
    configs = architecture(arch)
    started, cpu_started = time.perf_counter(), time.process_time()

    logger.info("stage 1: autoencoder, %d steps of %d images", vae_recipe.steps, vae_recipe.batch_size)
    stage1 = train_autoencoder(configs["vae"], vae_recipe, seed)

    pool_start = time.perf_counter()
    images, scenes = make_dataset(pool_size, seed=seed + 2)
    means, stds = encode_posteriors(stage1.vae, images)
    scaling_factor = latent_scaling_factor(means, stds, seed + 3)
    configs["vae"]["scaling_factor"] = scaling_factor
    pool = LatentPool(means=means, stds=stds, scenes=scenes, scaling_factor=scaling_factor)
    pool_seconds = time.perf_counter() - pool_start
    logger.info(
        "latent pool: %d images in %.0f s, scaling_factor %.5f", pool_size, pool_seconds, scaling_factor
    )

    logger.info(
        "stage 2: UNet + text encoder, %d steps of %d latents",
        diffusion_recipe.steps,
        diffusion_recipe.batch_size,
    )
    tokenizer = load_tokenizer(TOKENIZER_ASSETS)

    def save_checkpoint(step: int, unet: nn.Module, text_encoder: nn.Module) -> None:
        save_model(out_dir / "checkpoints" / f"step-{step}", configs, unet, text_encoder, stage1.vae)

    stage2 = train_diffusion(
        configs, tokenizer, pool, diffusion_recipe, seed, save_checkpoint, checkpoint_every
    )

    save_model(out_dir, configs, stage2.unet, stage2.text_encoder, stage1.vae)
    summary = {
        "seed": seed,
        "architecture": arch,
        "threads": torch.get_num_threads(),
        "autoencoder": {**asdict(vae_recipe), "final_loss": stage1.final_loss, "final_l1": stage1.final_l1},
        "latent_pool": {"images": pool_size, "scaling_factor": scaling_factor},
        "diffusion": {**asdict(diffusion_recipe), "final_loss": stage2.final_loss},
        "seconds": {
            "autoencoder": round(stage1.seconds),
            "latent_pool": round(pool_seconds),
            "diffusion": round(stage2.seconds),
            "total": round(time.perf_counter() - started),
            # CPU time of this process: what the run costs, whatever else shares the machine
            "cpu_total": round(time.process_time() - cpu_started),
        },
        "parameters": {
            "unet": sum(p.numel() for p in stage2.unet.parameters()),
            "vae": sum(p.numel() for p in stage1.vae.parameters()),
            "text_encoder": sum(p.numel() for p in stage2.text_encoder.parameters()),
        },
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s in %.0f s", out_dir, summary["seconds"]["total"])
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    vae_defaults, diffusion_defaults = AutoencoderRecipe(), DiffusionRecipe()
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="diffusers-format folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="embedded")
    parser.add_argument("--vae-steps", type=int, default=vae_defaults.steps)
    parser.add_argument("--vae-batch", type=int, default=vae_defaults.batch_size)
    parser.add_argument("--unet-steps", type=int, default=diffusion_defaults.steps)
    parser.add_argument("--unet-batch", type=int, default=diffusion_defaults.batch_size)
    parser.add_argument(
        "--shape-weight",
        type=float,
        default=diffusion_defaults.shape_weight,
        help="diffusion loss weight of the shape's latent pixels (1: uniform)",
    )
    parser.add_argument(
        "--text-aux-weight",
        type=float,
        default=diffusion_defaults.text_aux_weight,
        help="weight of the text encoder's attribute-classification loss (0: off)",
    )
    parser.add_argument(
        "--text-pretrain-steps",
        type=int,
        default=diffusion_defaults.text_pretrain_steps,
        help="steps of the text encoder alone on the auxiliary loss before the UNet joins (0: none)",
    )
    parser.add_argument("--pool-size", type=int, default=12000, help="encoded training images for stage 2")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="also save the model every N diffusion steps"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae_recipe = replace(
        vae_defaults,
        steps=args.vae_steps,
        batch_size=args.vae_batch,
        warmup_steps=min(vae_defaults.warmup_steps, max(args.vae_steps // 10, 1)),
    )
    diffusion_recipe = replace(
        diffusion_defaults,
        steps=args.unet_steps,
        batch_size=args.unet_batch,
        shape_weight=args.shape_weight,
        text_aux_weight=args.text_aux_weight,
        text_pretrain_steps=args.text_pretrain_steps,
        warmup_steps=min(diffusion_defaults.warmup_steps, max(args.unet_steps // 10, 1)),
    )
    train(
        args.out,
        args.seed,
        args.architecture,
        vae_recipe,
        diffusion_recipe,
        args.pool_size,
        args.checkpoint_every,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
