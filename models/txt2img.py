"""Command line for people without the service: one prompt in, PNGs out.

    python -m models.txt2img --prompt "a red circle in the top left on a blue background" --out out.png
    python -m models.txt2img --prompt "..." --init-image photo.png --strength 0.6 --out out.png
    python -m models.txt2img --prompt "..." --init-image photo.png --mask mask.png --out out.png

Several images are written as FILE-0.png, FILE-1.png, ... Each PNG carries its generation
parameters in A1111's `parameters` tEXt chunk. With --init-image, the size defaults to the image's own,
each side rounded down to the model's multiple (8), and the image is fitted to the size by
--resize-mode (models/image_inputs.py).
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

from models.hub import resolve_model_source
from models.image_files import encode_png, parameters_of
from models.image_inputs import ImageInputs, InputImageError, decode_image, default_size, load_inputs
from models.loading import load_model
from models.pipeline import check_generation, generate
from models.single_file import CheckpointError
from schemas.generation import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_MASK_BLUR,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    RESIZE_MODES,
    SDXL_FIELDS,
    SEED_MAX,
    Generation,
)
from schemas.samplers import SAMPLERS, SCHEDULERS
from schemas.vocabulary import vocabulary_warnings

logger = logging.getLogger("models.txt2img")

# the names the request gives its input images (the service's are Redis keys; here, the files')
INIT_IMAGE_NAME, MASK_IMAGE_NAME = "init-image-file", "mask-image-file"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m models.txt2img",
        description="Stable Diffusion text-to-image, img2img and inpainting (any sampler, CFG).",
    )
    parser.add_argument(
        "--model",
        help="diffusers-format folder, single .safetensors/.ckpt, or Hugging Face hub id org/name[@revision] "
        "(fetched once into the hub's cache) (default: the embedded model)",
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
    for name, meaning in (
        ("original-size", "HEIGHT WIDTH the picture should look as if taken at"),
        ("crops-coords-top-left", "TOP LEFT of the crop it should look cut from"),
        ("target-size", "HEIGHT WIDTH it is meant for"),
    ):
        parser.add_argument(
            f"--{name}", type=int, nargs=2, metavar="N", help=f"SDXL only: {meaning} (default: diffusers')"
        )
    parser.add_argument("--init-image", type=Path, help="img2img: the PNG, JPEG or WebP image to start from")
    parser.add_argument(
        "--strength",
        type=float,
        default=DEFAULT_STRENGTH,
        help=f"img2img: the share of the steps run, 0 to 1 (default {DEFAULT_STRENGTH})",
    )
    parser.add_argument(
        "--mask", type=Path, help="inpainting: a mask of the init image's size, white = repaint"
    )
    parser.add_argument(
        "--mask-blur",
        type=int,
        default=DEFAULT_MASK_BLUR,
        help=f"inpainting: Gaussian blur radius of the mask in pixels (default {DEFAULT_MASK_BLUR})",
    )
    parser.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="resize",
        help="how the init image and mask are fitted to the size: resize (stretch), crop, fill",
    )
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
        source = resolve_model_source(args.model, prefer_fp16=dtype == torch.float16)
        model = load_model(source.path, device=args.device, dtype=dtype)
    except (CheckpointError, OSError) as err:  # OSError: a missing path or the embedded model missing
        logger.error("cannot load the model: %s", err)
        return 2
    native_width, native_height = model.native_size
    num_images = args.num_images
    if args.mask is not None and args.init_image is None:
        logger.error("invalid argument: --mask needs --init-image (the image to repaint)")
        return 2
    files: dict[str, bytes] = {}
    try:
        for name, path in (("init", args.init_image), ("mask", args.mask)):
            if path is not None:
                files[name] = path.read_bytes()
        if "init" in files:  # the size defaults to the image's own
            native_width, native_height = default_size(
                *decode_image(files["init"], "--init-image").size, model.vae_scale_factor
            )
    except (OSError, InputImageError) as err:
        logger.error("cannot read the input image: %s", err)
        return 2
    image_fields = {}
    if "init" in files:
        image_fields = {
            "init_image": INIT_IMAGE_NAME,
            "mask_image": MASK_IMAGE_NAME if "mask" in files else None,
            "strength": args.strength,
            "mask_blur": args.mask_blur,
            "resize_mode": args.resize_mode,
        }
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
            **{name: tuple(value) for name in SDXL_FIELDS if (value := getattr(args, name)) is not None},
            **image_fields,
        )
        check_generation(model, request)
        inputs: ImageInputs | None = None
        if "init" in files:
            inputs = load_inputs(
                files["init"], files.get("mask"), request.width, request.height, request.resize_mode,
                request.mask_blur,
            )  # fmt: skip
    except ValidationError as err:
        logger.error("invalid argument: %s", "; ".join(_option_error(e) for e in err.errors()))
        return 2
    except ValueError as err:  # InputImageError too
        logger.error("invalid argument: %s", err)
        return 2

    for warning in vocabulary_warnings(request, model.vocabulary):  # words the model never saw
        logger.warning("%s", warning)
    start = time.perf_counter()
    images = generate(model, request, inputs=inputs)
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
