"""LoRAs in the batch: what one UNet call costs when its rows carry different LoRAs, against the same
call without any.

    python bench/lora_bench.py                 # CPU: tiny config, 8 rows across 4 LoRAs of rank 16
                                               # (goal: at most 1.3x the LoRA-free call)
    python bench/lora_bench.py --config sd15 --device cuda --rows 16 --loras 8 --rank 32 --size 512
                                               # the GPU goal (at most 1.15x), eager
    ... --accel graphs (or compile)            # through models/accel.py's runner: CUDA graphs (compiled)
    python bench/gpu.py --lora                 # on the GPU bench's default fast path (compiled, CUDA
                                               # graphs), as its opt-in stage "lora"

Cases, each the median of --repeats calls after a warm-up:
  plain       the UNet as loaded, no LoRA pool
  pool idle   the pool installed (adapted layers), the call without LoRA rows: what a LoRA-free batch
              pays on a worker with SD_LORA_DIR
  lora        every row with one LoRA (rows spread evenly over --loras slots), transformer layers
              (attention, feed-forward, proj_in/out: what kohya's LoRA trains)
  lora+locon  the same with the resnet/sampler convolutions adapted too (LoCon)
The ratio is each case's time over `plain`. Weights are random (time does not depend on them); the
adapters fill the pool's full rank (--rank = SD_LORA_MAX_RANK).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from models.configs import UNetConfig  # noqa: E402
from models.lora.pool import LoraPool  # noqa: E402
from models.unet import UNet2DConditionModel  # noqa: E402

CONFIGS = ("tiny", "sd15")


def build_unet(config: str, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    if config == "tiny":
        from models.tiny_configs import tiny_config

        unet_config = UNetConfig.from_dict(tiny_config("sd1")["unet"])
    else:
        import json

        path = ROOT / "models" / "reference_configs" / "sd1" / "unet" / "config.json"
        unet_config = UNetConfig.from_dict(json.loads(path.read_text()))
    with torch.device(device):
        unet = UNet2DConditionModel(unet_config)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def fill_pool(pool: LoraPool, std: float = 0.01) -> None:
    """Random adapters in every slot and layer, at the pool's full rank."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for layer in pool.layers.values():
            for buffer in (layer.lora_down, layer.lora_up):
                values = torch.randn(buffer.shape, generator=generator) * std
                buffer.copy_(values.to(buffer.dtype))


def row_inputs(rows: int, loras: int, conv: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """One LoRA per row (K = 1), rows spread evenly over `loras` slots, weight 0.8."""
    slots = (torch.arange(rows) % loras).reshape(rows, 1).to(device)
    scales = torch.full((rows, 1), 0.8, dtype=dtype, device=device)
    inputs = {"lora_slots": slots, "lora_scales": scales}
    if conv:
        inputs["lora_conv_scales"] = scales
    return inputs


def _timed(call: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1e3


def _medians(calls: dict[str, Any], repeats: int, device: torch.device) -> dict[str, float]:
    """Each call's median time; the calls take turns, so a busy neighbour slows them alike."""
    for call in calls.values():  # warm-up: lazy init, cuDNN autotuning, compile or capture
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(_timed(call, device))
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def measure(
    unet: torch.nn.Module,
    call_for: Any,
    rows: int,
    loras: int,
    rank: int,
    latent: tuple[int, int, int],
    repeats: int,
    copy_plain: bool = True,
) -> list[dict[str, Any]]:
    """The four cases on `unet` (installs a LoRA pool on it: do it last). `call_for(unet)` gives a
    `call(sample, t, context, row_inputs)` that runs one UNet call (the UNet itself, or a runner of
    it). `copy_plain`: the plain case on a copy of the UNet, taking turns with the others (else timed
    alone first, before the pool goes in)."""
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    generator = torch.Generator(device="cpu").manual_seed(1)
    sample = torch.randn((rows, *latent), generator=generator).to(device, dtype)
    timesteps = torch.full((rows,), 500.0, device=device)
    context = torch.randn((rows, 77, unet.config.cross_attention_dim[0]), generator=generator).to(
        device, dtype
    )

    def bound(call: Any, inputs: dict[str, Any] | None) -> Any:
        return lambda: call(sample, timesteps, context, inputs)

    plain = bound(call_for(copy.deepcopy(unet) if copy_plain else unet), None)
    ms = {} if copy_plain else _medians({"plain": plain}, repeats, device)
    pool = LoraPool(unet, loras, rank)
    fill_pool(pool)
    call = call_for(unet)
    calls = {"plain": plain} if copy_plain else {}
    calls |= {
        "pool idle": bound(call, None),
        "lora": bound(call, row_inputs(rows, loras, False, device, dtype)),
        "lora+locon": bound(call, row_inputs(rows, loras, True, device, dtype)),
    }
    ms |= _medians(calls, repeats, device)
    return [
        {"case": name, "ms": round(value, 2), "ratio": round(value / ms["plain"], 3)}
        for name, value in ms.items()
    ]


def table(results: list[dict[str, Any]], title: str) -> str:
    lines = [title, "", "| case | ms per UNet call | x plain |", "|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['ms']:.2f} | {r['ratio']:.3f} |" for r in results]
    return "\n".join(lines)


def stage(bench: Any) -> None:
    """bench/gpu.py's opt-in stage "lora" (--lora): SD 1.5 at the bench's size, --lora-rows rows across
    --lora-count LoRAs of rank --lora-rank, on the worker's default fast path (compiled, CUDA graphs),
    each case compiled/captured before it is timed. Last: the pool stays installed on the model."""
    import gpu  # the bench's own helpers (set_variant: the default fast path)

    args = bench.args
    model, _ = bench.built()
    runner = gpu.set_variant(bench, bench.default)
    latent = (model.latent_channels, args.size // 8, args.size // 8)

    def call_for(_: torch.nn.Module) -> Any:
        runner.release()  # graphs captured before the pool went in would replay the old layers
        return lambda sample, timesteps, context, inputs: runner(sample, timesteps, context, None, inputs)

    results = measure(
        model.unet,
        call_for,
        args.lora_rows,
        args.lora_count,
        args.lora_rank,
        latent,
        args.lora_repeats,
        False,
    )
    bench.results["lora"] = {
        "rows": args.lora_rows,
        "loras": args.lora_count,
        "rank": args.lora_rank,
        "cases": results,
        "runner": str(bench.default.accel),
    }
    print(
        table(
            results, f"LoRAs: {args.lora_rows} rows across {args.lora_count} LoRAs of rank {args.lora_rank}"
        )
    )
    runner.release()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument("--rows", type=int, default=8, help="UNet rows in the call")
    parser.add_argument("--loras", type=int, default=4, help="different LoRAs the rows are spread over")
    parser.add_argument("--rank", type=int, default=16, help="their rank (the pool's SD_LORA_MAX_RANK)")
    parser.add_argument(
        "--size", type=int, default=None, help="pixels per side (default: 256 tiny, 512 sd15)"
    )
    parser.add_argument(
        "--accel",
        choices=["eager", "graphs", "compile"],
        default="eager",
        help="cuda: plain calls, CUDA graphs per bucket, or the worker's default (compiled, in graphs)",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    size = args.size or (256 if args.config == "tiny" else 512)
    unet = build_unet(args.config, device, dtype)
    latent = (unet.config.out_channels, size // 8, size // 8)

    def call_for(module: torch.nn.Module) -> Any:
        if args.accel == "eager":
            return lambda sample, timesteps, context, inputs: module(sample, timesteps, context, None, inputs)
        from models.accel import FAST_CUDA, GRAPHS_ONLY_CUDA, UNetRunner, apply_backend_flags

        config = FAST_CUDA if args.accel == "compile" else GRAPHS_ONLY_CUDA
        apply_backend_flags(config)
        if config.channels_last:
            module.to(memory_format=torch.channels_last)
        runner = UNetRunner(module, config)
        return lambda sample, timesteps, context, inputs: runner(sample, timesteps, context, None, inputs)

    results = measure(unet, call_for, args.rows, args.loras, args.rank, latent, args.repeats)
    print(
        table(
            results,
            f"{args.config} {size}x{size} on {device} ({dtype}, {torch.get_num_threads()} threads): "
            f"{args.rows} "
            f"rows across {args.loras} LoRAs of rank {args.rank}",
        )
    )


if __name__ == "__main__":
    main()
