"""Command line for people without the service: one prompt in, PNGs out.

    python -m models.txt2img --prompt "a red circle in the top left on a blue background" --out out.png

Several images are written as FILE-0.png, FILE-1.png, ... Each PNG carries its generation
parameters in A1111's `parameters` tEXt chunk.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from models.default_model import default_model_path
from models.loading import load_model
from models.pipeline import check_generation, generate
from models.png import encode_png, parameters_of
from models.single_file import CheckpointError
from schemas.generation import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, SEED_MAX, Generation
from schemas.samplers import SAMPLERS, SCHEDULERS

logger = logging.getLogger("models.txt2img")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m models.txt2img", description="Stable Diffusion text-to-image (any sampler, CFG)."
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="diffusers-format folder or single .safetensors/.ckpt (default: the embedded model)",
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--width", type=int, help="default: the model's native width")
    parser.add_argument("--height", type=int, help="default: the model's native height")
    parser.add_argument("--steps", type=int, help="default: what the model recommends, else 50")
    parser.add_argument("--guidance-scale", type=float, help="default: what the model recommends, else 7.5")
    parser.add_argument(
        "--sampler",
        help=f'one of {", ".join(SAMPLERS)} or AUTOMATIC1111\'s names ("DPM++ 2M Karras", "Euler a"); '
        "default: what the model recommends, else ddim",
    )
    parser.add_argument(
        "--scheduler", help=f"one of {', '.join(SCHEDULERS)} (default: the model's, else normal)"
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (other samplers ignore it)")
    parser.add_argument("--seed", type=int, help="default: random (printed)")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--out", type=Path, required=True, help="output PNG path")
    return parser.parse_args(argv)


def output_paths(out: Path, count: int) -> list[Path]:
    """FILE.png for one image; FILE-0.png, FILE-1.png, ... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def sampler_choice(args: argparse.Namespace, recommended: dict) -> dict[str, str]:
    """sampler and scheduler: as given, else the model's recommendation (a scheduler only for the
    sampler it was recommended with), else Generation's defaults."""
    choice: dict[str, str] = {}
    sampler = args.sampler or recommended.get("sampler")
    if sampler:
        choice["sampler"] = sampler
    if args.scheduler:
        choice["scheduler"] = args.scheduler
    elif not args.sampler and recommended.get("scheduler"):
        choice["scheduler"] = recommended["scheduler"]
    return choice


def _option_error(error: dict) -> str:
    """A validation error in the command line's words: "--width: width must be a positive multiple of 8"."""
    field = str(error["loc"][0]) if error.get("loc") else ""
    if error.get("type") == "multiple_of":  # every size bound is also >= the multiple
        message = f"must be a positive multiple of {error['ctx']['multiple_of']}"
    else:
        message = error["msg"].replace("Input should be", "must be")
    return f"--{field.replace('_', '-')}: {field} {message}" if field else error["msg"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        logger.error("--device cuda: no CUDA device is available")
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)
    try:
        model = load_model(args.model or default_model_path(), device=args.device, dtype=dtype)
    except (CheckpointError, OSError) as err:  # OSError: a missing path or the embedded model missing
        logger.error("cannot load the model: %s", err)
        return 2
    native_width, native_height = model.native_size
    num_images = args.num_images
    try:
        request = Generation(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            width=args.width or native_width,
            height=args.height or native_height,
            steps=args.steps
            if args.steps is not None
            else int(model.recommended.get("steps", DEFAULT_STEPS)),
            guidance_scale=(
                args.guidance_scale
                if args.guidance_scale is not None
                else float(model.recommended.get("guidance_scale", DEFAULT_GUIDANCE_SCALE))
            ),
            eta=args.eta,
            **sampler_choice(args, model.recommended),
            seed=args.seed if args.seed is not None else secrets.randbelow(SEED_MAX - max(num_images, 1) + 2),
            num_images=num_images,
        )
        check_generation(model, request)
    except ValidationError as err:
        logger.error("invalid argument: %s", "; ".join(_option_error(e) for e in err.errors()))
        return 2
    except ValueError as err:
        logger.error("invalid argument: %s", err)
        return 2

    start = time.perf_counter()
    images = generate(model, request)
    elapsed = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path, image, seed in zip(
        output_paths(args.out, len(images)), images, request.image_seeds(), strict=True
    ):
        path.write_bytes(encode_png(image, parameters_of(request, seed, model.name)))
        logger.info("wrote %s (seed %d)", path, seed)
    logger.info("%d image(s) in %.2f s", len(images), elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
