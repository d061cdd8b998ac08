"""Our pipeline vs diffusers' StableDiffusionXLPipeline on a tiny SDXL-architecture model, CPU.

    python bench/sdxl_bench.py                   # tiny SDXL config, 64x64, 20 steps, 5 repeats
    python bench/sdxl_bench.py --samplers euler dpmpp_2m:karras --repeats 9 --json runs/sdxl_cpu.json

Both pipelines load the same random diffusers folder (`models/random_model.py --variant sdxl`:
two text encoders, the "text_time" added conditioning, two transformer layers in a level). After a
warm-up each, their runs ALTERNATE (ours, diffusers, ours, ...) so the noise of a shared machine
falls on both alike; medians of `--repeats` generations of one guided image with a negative prompt.
"paired" is the median of ours/diffusers over back-to-back runs. Each row also reports the largest
pixel difference between the two pictures. The ratio is ours / diffusers (lower is better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a red circle in the top left on a blue background"
NEGATIVE = "blurry"


def sides(folder: Path, size: int, steps: int, sampler: str, scheduler: str) -> dict:
    """{"ours": fn, "diffusers": fn}: each generates the same request's one image as (H, W, 3) uint8."""
    import numpy as np
    import torch

    from models.loading import load_model
    from models.pipeline import generate
    from schemas.generation import Generation
    from tests.support.diffusers_reference import diffusers_scheduler

    request = Generation(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=size,
        height=size,
        steps=steps,
        guidance_scale=7.5,
        sampler=sampler,
        scheduler=scheduler,
        seed=1,
    )
    model = load_model(folder)

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.scheduler = diffusers_scheduler(dict(pipe.scheduler.config), sampler, scheduler)
    pipe.set_progress_bar_config(disable=True)

    def theirs() -> np.ndarray:
        out = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=request.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(request.seed)],
            output_type="np",
        )
        return (out.images[0] * 255).round().astype("uint8")

    return {"ours": lambda: generate(model, request)[0], "diffusers": theirs}


def time_both(fns: dict, repeats: int) -> dict:
    import numpy as np

    images = {side: fn() for side, fn in fns.items()}  # warm-up
    wall: dict[str, list[float]] = {side: [] for side in fns}
    cpu: dict[str, list[float]] = {side: [] for side in fns}
    for _ in range(repeats):
        for side, fn in fns.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            images[side] = fn()
            wall[side].append(time.perf_counter() - start)
            cpu[side].append(time.process_time() - cpu_start)
    return {
        "ours_s": statistics.median(wall["ours"]),
        "diffusers_s": statistics.median(wall["diffusers"]),
        "ours_cpu_s": statistics.median(cpu["ours"]),
        "diffusers_cpu_s": statistics.median(cpu["diffusers"]),
        "paired_ratio": statistics.median(
            o / d for o, d in zip(wall["ours"], wall["diffusers"], strict=True)
        ),
        "max_pixel_diff": int(np.abs(images["ours"].astype(int) - images["diffusers"].astype(int)).max()),
        "times_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--samplers", nargs="+", default=["euler", "ddim"], help="SAMPLER or SAMPLER:SCHEDULER (ours' names)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    import torch

    from models.random_model import build_random_model

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_random_model("sdxl", Path(tmp) / "tiny-sdxl", seed=0)
        for choice in args.samplers:
            sampler, _, scheduler = choice.partition(":")
            timing = time_both(
                sides(folder, args.size, args.steps, sampler, scheduler or "normal"), args.repeats
            )
            rows.append({"sampler": choice, "size": args.size, "steps": args.steps, **timing})

    header = (
        f"{'sampler':18} {'size':>5} {'steps':>5} {'ours s/img':>11} {'diffusers s/img':>16} {'ratio':>6} "
        f"{'paired':>7} {'ours cpu s':>11} {'diff. cpu s':>12} {'max px diff':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['sampler']:18} {r['size']:>5} {r['steps']:>5} {r['ours_s']:>11.3f} {r['diffusers_s']:>16.3f} "
            f"{r['ours_s'] / r['diffusers_s']:>6.2f} {r['paired_ratio']:>7.2f} {r['ours_cpu_s']:>11.3f} "
            f"{r['diffusers_cpu_s']:>12.3f} {r['max_pixel_diff']:>12}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
