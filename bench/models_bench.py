"""Our pipeline vs diffusers' StableDiffusionPipeline: time per image and peak memory, same weights.

    python bench/models_bench.py                       # tiny config + SD 1.5 architecture, CPU
    python bench/models_bench.py --configs sd15 --size 512 --steps 50 --device cuda --dtype float16

Each side runs in its own subprocess (so peak memory is its own): it builds the model with seeded
random weights (every parameter seeded from its name, so both sides get identical weights without
copying), warms up, then times `--repeats` generations of one image (CFG, DDIM, `--steps` steps) and
reports the median. Peak memory is the process's peak resident set (CPU) or the CUDA allocator's
peak (GPU) during the timed runs. Prints a table; the ratio is ours / diffusers (lower is better).
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


def run_side(
    side: str, config_name: str, size: int, steps: int, repeats: int, device: str, dtype_name: str
) -> dict:
    """One side in this process; returns its timings and peak memory."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.configs import UNetConfig, VAEConfig
    from models.ddim import DDIMSchedule
    from models.loading import TOKENIZER_ASSETS, load_tokenizer
    from models.sampler import GenerationRequest, generate
    from models.stable_diffusion import StableDiffusion

    torch.manual_seed(0)
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

    request = GenerationRequest(
        prompt="a red circle in the top left on a blue background",
        negative_prompt="blurry",
        width=size,
        height=size,
        steps=steps,
        guidance_scale=7.5,
        seed=1,
    )
    if side == "ours":
        model = StableDiffusion(
            "bench", unet, vae, text_encoder, tokenizer, DDIMSchedule.from_config(configs["scheduler"])
        )

        def once():
            return generate(model, request)[0]
    else:
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

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    image = once()  # warm-up
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            image = once()
            sync()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    return {
        "side": side,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_bytes": peak,
        "image_mean": float(image.mean()),
        "image": image.tolist() if size <= 64 else None,
    }


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
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side and print JSON
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_side(
            args.side, args.config, args.size, args.steps, args.repeats, args.device, args.dtype
        )
        print("RESULT " + json.dumps(result))
        return

    rows = []
    for config in args.configs:
        size = args.size or (64 if config == "tiny" else 256)
        steps = args.steps or (20 if config == "tiny" else 3)
        results = {}
        for side in ("ours", "diffusers"):
            cmd = [sys.executable, __file__, "--side", side, "--config", config, "--size", str(size)]
            cmd += ["--steps", str(steps), "--repeats", str(args.repeats), "--device", args.device]
            cmd += ["--dtype", args.dtype, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{side} {config} failed:\n{out.stderr[-3000:]}")
            results[side] = json.loads(line[len("RESULT ") :])
        ours, ref = results["ours"], results["diffusers"]
        same = None
        if ours["image"] is not None:
            import numpy as np

            same = int(np.abs(np.array(ours["image"]) - np.array(ref["image"])).max())
        rows.append(
            {
                "config": config,
                "size": size,
                "steps": steps,
                "device": args.device,
                "dtype": args.dtype,
                "ours_s": ours["median_s"],
                "diffusers_s": ref["median_s"],
                "ratio": ours["median_s"] / ref["median_s"],
                "ours_peak_gb": ours["peak_bytes"] / 2**30,
                "diffusers_peak_gb": ref["peak_bytes"] / 2**30,
                "max_pixel_diff": same,
            }
        )

    header = f"{'config':8} {'size':>5} {'steps':>5} {'ours s/img':>11} {'diffusers s/img':>16} {'ratio':>6} {'ours peak GB':>13} {'diffusers peak GB':>18}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:8} {r['size']:>5} {r['steps']:>5} {r['ours_s']:>11.3f} {r['diffusers_s']:>16.3f} "
            f"{r['ratio']:>6.2f} {r['ours_peak_gb']:>13.2f} {r['diffusers_peak_gb']:>18.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
