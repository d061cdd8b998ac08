"""Time one image of the embedded model at its native size and default steps: ours vs diffusers.

    python bench/embedded_model_bench.py                 # models/embedded_model, 1 thread
    python bench/embedded_model_bench.py --threads 2 --repeats 20

Both sides load the same diffusers-format folder (diffusers' StableDiffusionPipeline with a
DDIMScheduler reads it as it is), warm up, then generate one image (`--steps`, `--guidance`,
default: the folder's defaults.json) `--repeats` times; the table gives the median seconds per
image and the ratio ours / diffusers (lower is better). CPU only: this is the laptop path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a red circle in the top left on a blue background"


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(folder: Path, steps: int, guidance: float, repeats: int) -> tuple[float, tuple[int, int]]:
    """(median seconds per image, the native (width, height) it was timed at)."""
    from models.loading import load_model
    from models.pipeline import generate
    from schemas.generation import Generation

    model = load_model(folder)
    width, height = model.native_size
    request = Generation(
        prompt=PROMPT, width=width, height=height, steps=steps, guidance_scale=guidance, seed=0
    )
    return median_seconds(lambda: generate(model, request), repeats), (width, height)


def diffusers_side(folder: Path, steps: int, guidance: float, repeats: int) -> float:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def run() -> object:
        return pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(0)],
            output_type="np",
        )

    return median_seconds(run, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "embedded_model")
    parser.add_argument("--steps", type=int, help="default: the folder's defaults.json")
    parser.add_argument("--guidance", type=float, help="default: the folder's defaults.json")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from models.loading import read_recommended

    recommended = read_recommended(args.model / "defaults.json")
    steps = args.steps or int(recommended["steps"])
    guidance = args.guidance if args.guidance is not None else float(recommended["guidance_scale"])

    ours_s, (width, height) = ours(args.model, steps, guidance, args.repeats)
    theirs_s = diffusers_side(args.model, steps, guidance, args.repeats)
    size = f"{width}x{height}"
    print(f"embedded model, {size}, {steps} DDIM steps, guidance {guidance:g}, {args.threads} thread(s), "
          f"median of {args.repeats}")  # fmt: skip
    print("| pipeline | s / image | ratio ours / diffusers |")
    print("|---|---:|---:|")
    print(f"| ours (models.pipeline.generate) | {ours_s:.3f} | {ours_s / theirs_s:.2f} |")
    print(f"| diffusers StableDiffusionPipeline | {theirs_s:.3f} | 1.00 |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
