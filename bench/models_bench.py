"""Our pipeline vs diffusers' StableDiffusionPipeline: time per image and peak memory, same weights.

    python bench/models_bench.py                       # tiny config + SD 1.5 architecture, CPU
    python bench/models_bench.py --configs sd15 --size 512 --steps 50 --device cuda --dtype float16

Both pipelines are built in one process with seeded random weights (every parameter seeded from
its name, so both sides get identical weights without copying); after a warm-up each, their runs
ALTERNATE (ours, diffusers, ours, ...) so the noise of a shared machine falls on both alike, and
the median of `--repeats` generations of one image (CFG, DDIM, `--steps` steps) is reported.
Peak memory is measured apart: each side alone in its own subprocess, one generation, the peak
resident set (CPU) or the CUDA allocator's peak (GPU). Prints a table; the ratio is
ours / diffusers (lower is better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def configs_for(name: str) -> dict:
    import json as _json

    from models.loading import SINGLE_FILE_CONFIGS
    from models.tiny_configs import tiny_config

    if name == "tiny":
        return tiny_config("sd1")
    if name == "sd15":
        folder = SINGLE_FILE_CONFIGS["sd1"]
        return {
            "unet": _json.loads((folder / "unet" / "config.json").read_text()),
            "vae": _json.loads((folder / "vae" / "config.json").read_text()),
            "text_encoder": _json.loads((folder / "text_encoder" / "config.json").read_text()),
            "scheduler": _json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        }
    raise ValueError(f"unknown config {name!r}")


def seeded_randomize(module, seed: int) -> None:
    """Every parameter from a generator seeded by (seed, its name): order-independent weights."""
    import math

    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if param.dim() >= 2:
                values = torch.randn(param.shape, generator=gen) / math.sqrt(math.prod(param.shape[1:]))
            elif name.endswith("weight"):
                values = 1 + 0.1 * torch.randn(param.shape, generator=gen)
            else:
                values = 0.05 * torch.randn(param.shape, generator=gen)
            param.copy_(values)


class PeakRSS:
    """Samples this process's resident set size every few ms (Linux /proc)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def build_side(side: str, config_name: str, size: int, steps: int, device: str, dtype_name: str):
    """Build one side's pipeline; returns a function generating one image as (H, W, 3) uint8."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.configs import UNetConfig, VAEConfig
    from models.loading import TOKENIZER_ASSETS, load_tokenizer
    from models.noise_schedule import NoiseSchedule
    from models.pipeline import generate
    from models.stable_diffusion import StableDiffusion
    from schemas.generation import Generation

    dtype = getattr(torch, dtype_name)
    configs = configs_for(config_name)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    tokenizer = load_tokenizer(TOKENIZER_ASSETS)
    if side == "ours":
        from models.unet import UNet2DConditionModel
        from models.vae import AutoencoderKL

        unet = UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]))
        vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]))
    else:
        from diffusers import AutoencoderKL as DAutoencoderKL
        from diffusers import UNet2DConditionModel as DUNet

        unet = DUNet(**{k: v for k, v in configs["unet"].items() if not k.startswith("_")})
        vae = DAutoencoderKL(**{k: v for k, v in configs["vae"].items() if not k.startswith("_")})
    for module in (unet, vae, text_encoder):
        seeded_randomize(module, seed=0)
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)

    request = Generation(
        prompt="a red circle in the top left on a blue background",
        negative_prompt="blurry",
        width=size,
        height=size,
        steps=steps,
        guidance_scale=7.5,
        seed=1,
    )
    if side == "ours":
        schedule = NoiseSchedule.from_config(configs["scheduler"])
        model = StableDiffusion("bench", unet, vae, text_encoder, tokenizer, schedule)
        return lambda: generate(model, request)[0]

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def once():
        out = pipe(
            request.prompt,
            negative_prompt=request.negative_prompt,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=request.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(request.seed)],
            output_type="np",
        )
        return (out.images[0] * 255).round().astype("uint8")

    return once


def timed(fn, device: str) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result). CPU time is the steadier figure on a
    shared machine: other processes' load stretches wall time but not our own CPU time (with one
    torch thread; with several, OpenMP spin-waits inflate it)."""
    import torch

    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, result


def time_both(config_name: str, size: int, steps: int, repeats: int, device: str, dtype_name: str) -> dict:
    """Both sides in this process, runs alternating; medians, paired ratios and the pixel difference."""
    import numpy as np

    sides = {
        side: build_side(side, config_name, size, steps, device, dtype_name) for side in ("ours", "diffusers")
    }
    images = {side: fn() for side, fn in sides.items()}  # warm-up
    wall: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, fn in sides.items():
            elapsed, cpu_s, images[side] = timed(fn, device)
            wall[side].append(elapsed)
            cpu[side].append(cpu_s)
    diff = int(np.abs(images["ours"].astype(int) - images["diffusers"].astype(int)).max())
    return {
        "times_s": wall,
        "cpu_s": cpu,
        "median_s": {s: statistics.median(t) for s, t in wall.items()},
        "median_cpu_s": {s: statistics.median(t) for s, t in cpu.items()},
        # ours / diffusers of back-to-back runs: robust to load that drifts during the benchmark
        "paired_ratio": statistics.median(
            o / d for o, d in zip(wall["ours"], wall["diffusers"], strict=True)
        ),
        "max_pixel_diff": diff,
    }


def peak_memory(side: str, config_name: str, size: int, steps: int, device: str, dtype_name: str) -> int:
    """Peak bytes of one generation (after a warm-up) with only this side in the process."""
    import torch

    fn = build_side(side, config_name, size, steps, device, dtype_name)
    fn()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        timed(fn, device)
        return torch.cuda.max_memory_allocated()
    with PeakRSS() as rss:
        timed(fn, device)
    return rss.peak


def subprocess_json(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--size", type=int, help="image side in pixels (default: 64 tiny, 256 sd15)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: 20 tiny, 3 sd15)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: time | ours | diffusers
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    common = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    if args.mode:  # internal: one measurement in this process, printed as JSON
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.mode == "time":
            result = time_both(args.config, args.size, args.steps, args.repeats, args.device, args.dtype)
        else:
            result = {
                "peak_bytes": peak_memory(
                    args.mode, args.config, args.size, args.steps, args.device, args.dtype
                )
            }
        print("RESULT " + json.dumps(result))
        return

    rows = []
    for config in args.configs:
        size = args.size or (64 if config == "tiny" else 256)
        steps = args.steps or (20 if config == "tiny" else 3)
        what = ["--config", config, "--size", str(size), "--steps", str(steps), *common]
        timing = subprocess_json(["--mode", "time", "--repeats", str(args.repeats), *what])
        peaks = {
            side: subprocess_json(["--mode", side, *what])["peak_bytes"] for side in ("ours", "diffusers")
        }
        rows.append(
            {
                "config": config,
                "size": size,
                "steps": steps,
                "device": args.device,
                "dtype": args.dtype,
                "repeats": args.repeats,
                "ours_s": timing["median_s"]["ours"],
                "diffusers_s": timing["median_s"]["diffusers"],
                "ratio": timing["median_s"]["ours"] / timing["median_s"]["diffusers"],
                "paired_ratio": timing["paired_ratio"],
                "ours_cpu_s": timing["median_cpu_s"]["ours"],
                "diffusers_cpu_s": timing["median_cpu_s"]["diffusers"],
                "ours_peak_gb": peaks["ours"] / 2**30,
                "diffusers_peak_gb": peaks["diffusers"] / 2**30,
                "max_pixel_diff": timing["max_pixel_diff"],
                "times_s": timing["times_s"],
                "cpu_s": timing["cpu_s"],
            }
        )

    header = (
        f"{'config':7} {'size':>5} {'steps':>5} {'ours s/img':>11} {'diffusers s/img':>16} {'ratio':>6} "
        f"{'paired':>7} {'ours cpu s':>11} {'diff. cpu s':>12} "
        f"{'ours peak GB':>13} {'diffusers peak GB':>18} {'max px diff':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:7} {r['size']:>5} {r['steps']:>5} {r['ours_s']:>11.3f} {r['diffusers_s']:>16.3f} "
            f"{r['ratio']:>6.2f} {r['paired_ratio']:>7.2f} {r['ours_cpu_s']:>11.2f} {r['diffusers_cpu_s']:>12.2f} "
            f"{r['ours_peak_gb']:>13.2f} {r['diffusers_peak_gb']:>18.2f} {r['max_pixel_diff']:>12}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
