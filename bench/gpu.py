"""SD 1.5 on one GPU: our engine against diffusers, each optimisation alone, continuous batching.

    python bench/gpu.py                  # CUDA: SD 1.5, 512x512, 50 steps, CFG 7.5 (about 7-8 minutes)
    python bench/gpu.py --quick          # tiny config on the CPU: the same code paths in seconds

Stages, in order (each timed; one that fails is reported and the others go on; optional ones are
skipped once --budget-s would be exceeded; `--skip NAME` leaves one out):
  build      SD 1.5's architecture, seeded random weights (speed does not depend on their values),
             built on the device; FLOPs of a CFG step and a decode counted by PyTorch
  precision  final latents of float16 (eager, fast path) and bfloat16 against float32 (no TF32):
             relative error ||x - x32|| / ||x32||, pass at <= 1e-2
  vae        the decode alone: float32 against float16 VAE, time for --ablation-batch latents in
             --vae-batch chunks, pixels of the same latents both ways, the float32 fallback taking
             over a float16 decode that overflows
  ours       --batches one-image requests through the Pipeline exactly as the engine drives it, with
             the worker's default fast path (models/accel.py: torch.compile in CUDA graphs per
             bucket, channels_last, float16 UNet and VAE with the float32 fallback decoder)
  kernels    the compiled UNet call of the largest batch (--kernel-rows, 32 for batch 16 with CFG) by
             kind of kernel: convolution, GEMM, attention, elementwise/normalization, other
  buckets    one UNet call at row counts between 32 and 64 (--bucket-rows), padded to the default
             CUDA-graph buckets against finer ones (--fine-buckets)
  diffusers  StableDiffusionPipeline, float16 (VAE too, as it ships), SDPA, DDIM, same weights,
             same prompts and seeds, same batches
  engine     --engine-requests jobs at once through the real engine (continuous batching, decode,
             PNG encoding), Redis replaced by in-memory sinks; with the PNG/decode tail after the
             last UNet call
  worker     the same through a real worker process and Redis (bench/worker_bench.py; needs
             redis-server, redis, rq)
  ablations  at --ablation-batch: each optimisation switched off (or changed) alone (after the
             worker, which runs on its defaults; before it with --worker-compile)
  lora       (--lora) one UNet call with rows across different LoRAs against the same call without,
             on the default fast path (bench/lora_bench.py; issue 18's goal: <= 1.15x)
  sdxl       SDXL base's architecture (bench/gpu_sdxl.py): 1024x1024, 30 Euler steps, CFG, float16,
             random weights built on the device, --sdxl-batches: images/s and peak memory, ours
             against diffusers' StableDiffusionXLPipeline in the same run
Figures: images/s (batch / wall time from prompts to uint8 pixels), ms per denoising step (steady
state), MFU = FLOPs / time / the card's dense fp16 peak (SD 1.5 at 512: 1.61 TFLOP per CFG step,
2.5 TFLOP per decode, 82.9 TFLOP per 50-step image). Tables on stdout; gpu_bench.json and
gpu_bench.md in --out (default: $OUT when set).

Each stage is one function over `Bench` (the arguments, the model, the results); `plan` lists
them in order.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import gpu_runs as runs  # noqa: E402
import gpu_sdxl  # noqa: E402
import lora_bench  # noqa: E402
import torch  # noqa: E402
from gpu_report import markdown  # noqa: E402

from models.accel import (  # noqa: E402
    DEFAULT_BUCKETS,
    FAST_CUDA,
    AccelConfig,
    UNetRunner,
    VAEDecoder,
    apply_backend_flags,
    fuse_attention_projections,
    prepare,
    prepare_vae,
    set_memory_format,
)
from models.pipeline import Pipeline  # noqa: E402
from models.stable_diffusion import StableDiffusion  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Buckets every 8 rows from 32 to 64: less padding for calls between 32 and 64 rows (a call of 34
# rows computes 40 instead of 48), for two more CUDA graphs (capture time and pool memory)
FINE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of our path: UNet/text dtype, VAE dtype, fast-path switches."""

    key: str  # short name for --ablations
    name: str
    dtype: torch.dtype
    vae_dtype: torch.dtype
    accel: AccelConfig
    slow: bool = False  # last, and only with --slow-ablations
    needs_s: float = 15.0  # rough cost on an H100 (warm-up + one 50-step batch of 16)
    # only when named in --ablations: its figure means something at a batch chosen for it
    extra: bool = False


def ablations(
    fast: AccelConfig, half: torch.dtype, compile_backend: str, fine_buckets: tuple[int, ...] = FINE_BUCKETS
) -> list[Variant]:
    """The fast path, then the uncompiled path (CUDA graphs only) and each part of it switched off
    or changed alone, then torch.compile's variants on top of it (`half`: the UNet dtype), then
    the extra ones (only when asked by key)."""
    r = dataclasses.replace
    h = str(half).removeprefix("torch.")
    fast = r(fast, compile_backend=compile_backend) if fast.compile_mode != "off" else fast
    graphs = r(fast, compile_mode="off", channels_last=False)  # what the variants below change
    vae = half if half == FP16 else FP32  # the worker's default VAE dtype on CUDA

    def on_fast(key: str, name: str, needs_s: float, **changes: Any) -> Variant:
        """The fast path (the worker's default) with `changes`."""
        return Variant(key, name, half, vae, r(fast, **changes), needs_s=needs_s)

    def compiled(key: str, name: str, needs_s: float = 150, **changes: Any) -> Variant:
        """torch.compile inside the graphs (inductor compiles the UNet: about a minute), plus `changes`."""
        accel = r(graphs, **{"compile_mode": "default", "compile_backend": compile_backend, **changes})
        return Variant(key, name, half, vae, accel, slow=True, needs_s=needs_s)

    return [
        Variant(
            "default",
            "fast path (default)",
            half,
            vae,
            fast,
            # the ours stage compiled the same graphs: inductor's cache has them
            needs_s=60 if fast.compile_mode != "off" else 15,
        ),
        # each a compile of its own; autotuning benchmarks every matmul shape
        on_fast("fuse-projections", "+ q/k/v projections fused", 90, fuse_projections=True),
        on_fast("conv1x1", "+ 1x1 convolutions as matmuls (inductor)", 90, compile_conv_1x1_as_mm=True),
        on_fast(
            "autotune-matmuls", "+ Triton matmul autotuning (inductor)", 180, compile_autotune_matmuls=True
        ),
        Variant("vae-fp32", "default, VAE float32", half, FP32, fast, needs_s=60),
        on_fast("vae-contiguous", "default, VAE contiguous", 60, vae_channels_last=False),
        on_fast("vae-compile", "default + VAE decoder compiled", 120, compile_vae=True),
        Variant("graphs", "CUDA graphs only (SD_COMPILE=off)", half, vae, graphs),
        Variant("no-graphs", "- CUDA graphs", half, vae, r(graphs, cuda_graphs=False)),
        Variant("channels-last", "+ channels_last", half, vae, r(graphs, channels_last=True)),
        Variant("flash", "attention: flash", half, vae, r(graphs, sdpa_backend="flash")),
        Variant("efficient", "attention: efficient", half, vae, r(graphs, sdpa_backend="efficient")),
        Variant("cudnn", "attention: cudnn", half, vae, r(graphs, sdpa_backend="cudnn")),
        Variant("bf16", "UNet bfloat16", BF16, FP32, graphs),
        Variant(
            "no-tf32", "- TF32, - cuDNN autotune", half, vae, r(graphs, tf32=False, cudnn_benchmark=False)
        ),
        Variant("eager", f"all off: plain eager {h}", half, vae, AccelConfig()),
        compiled("compile", "+ torch.compile (default mode) in the graphs"),
        compiled("compile-cl", "+ torch.compile + channels_last", channels_last=True),
        compiled(
            "compile-dynamic",
            "+ torch.compile, batch dimension dynamic (one graph for all buckets)",
            compile_dynamic_batch=True,
        ),
        compiled(
            "compile-dynamic-cl",
            "+ torch.compile, batch dimension dynamic, + channels_last",
            compile_dynamic_batch=True,
            channels_last=True,
        ),
        compiled(
            "compile-max-autotune",
            "+ torch.compile max-autotune-no-cudagraphs, batch dimension dynamic, + channels_last",
            needs_s=300,  # inductor benchmarks its conv and matmul templates: minutes
            compile_mode="max-autotune-no-cudagraphs",
            compile_dynamic_batch=True,
            channels_last=True,
        ),
        Variant("math", "attention: math", half, vae, r(graphs, sdpa_backend="math"), slow=True, needs_s=30),
        Variant("fp32", "float32 UNet (TF32)", FP32, FP32, graphs, slow=True, needs_s=40),
        # at batch 16 (32 rows, a default bucket) it should match the default: run it at a batch
        # whose rows fall between 32 and 64, e.g. --ablation-batch 20 (40 rows, 48 by default)
        dataclasses.replace(
            on_fast("buckets-fine", "+ finer CUDA-graph buckets (--fine-buckets)", 30, buckets=fine_buckets),
            extra=True,
        ),
    ]


class MasterWeights:
    """float32 weights of the model as built, to give it any dtype exactly (one rounding) later."""

    def __init__(self, model: StableDiffusion) -> None:
        self.states = {
            name: {k: v.detach().clone() for k, v in getattr(model, name).state_dict().items()}
            for name in ("unet", "vae", "text_encoder")
        }

    def apply(self, model: StableDiffusion, dtype: torch.dtype, vae_dtype: torch.dtype) -> None:
        fuse_attention_projections(model, fuse=False)  # diffusers' keys, as the states have them
        model.to(dtype=dtype, vae_dtype=vae_dtype)
        for name, state in self.states.items():
            getattr(model, name).load_state_dict(state)


def compile_signature(accel: AccelConfig) -> tuple[Any, ...] | None:
    """What a torch.compile of the UNet depends on beyond what dynamo guards itself (dtypes, layouts,
    the modules' structure): None when nothing is compiled. Inductor's own options count only with
    inductor: other backends (the CPU check's eager) do not receive them."""
    if accel.compile_mode == "off" and not accel.compile_vae:
        return None
    inductor = (accel.compile_conv_1x1_as_mm, accel.compile_autotune_matmuls)
    return (
        accel.compile_mode,
        accel.compile_backend,
        accel.compile_dynamic_batch,
        *(inductor if accel.compile_backend == "inductor" else ()),
    )


Stage = Callable[["Bench"], None]


@dataclasses.dataclass
class Bench:
    """What the stages share: the arguments, the results (saved after every stage), the model and
    its float32 master weights once built, and what one stage leaves for a later one."""

    args: argparse.Namespace
    device: torch.device
    out: Path | None  # where gpu_bench.json/.md go; None: stdout only
    results: dict[str, Any]
    fast: AccelConfig  # the worker's default fast path, with --compile-backend
    half: torch.dtype  # the UNet's dtype on the timed paths (--dtype)
    variants: dict[str, Variant]  # every ablation by key, in the bench's order
    started: float = dataclasses.field(default_factory=time.perf_counter)
    model: StableDiffusion | None = None  # the build stage's
    master: MasterWeights | None = None
    fp32_latents: torch.Tensor | None = None  # precision: float32's final latents (the reference)
    fp16_latents: torch.Tensor | None = None  # precision: float16 eager's
    ablation_latents: torch.Tensor | None = None  # the first ablation's, the others compared with it
    vae_decoder: VAEDecoder | None = None  # the current variant's (None: vae.decode as it is)
    compiled_with: tuple[Any, ...] | None = None  # compile_signature of the last compile

    @classmethod
    def create(cls, args: argparse.Namespace) -> Bench:
        device = torch.device(args.device)
        # the worker's default fast path (compiled; --compile-backend eager on the CPU check)
        fast = dataclasses.replace(FAST_CUDA, compile_backend=args.compile_backend)
        half = DTYPES[args.dtype]
        return cls(
            args=args,
            device=device,
            out=Path(args.out) if args.out else None,
            results={"meta": meta(args, device), "stages": {}},
            fast=fast,
            half=half,
            variants={v.key: v for v in ablations(fast, half, args.compile_backend, args.fine_buckets)},
        )

    @property
    def default(self) -> Variant:
        """The worker's defaults: UNet and VAE dtype, fast path."""
        return self.variants["default"]

    def built(self) -> tuple[StableDiffusion, MasterWeights]:
        if self.model is None or self.master is None:
            raise RuntimeError("the build stage has not run")
        return self.model, self.master

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def stage(self, name: str, fn: Stage, needs_s: float = 0.0) -> None:
        """Run one stage; a stage that raises is recorded and the bench goes on."""
        stages = self.results["stages"]
        if name in self.args.skip or name.split(":")[0] + "s" in self.args.skip:
            stages[name] = {"status": "skipped (--skip)"}
            self.log(f"{name}: skipped (--skip)")
            return
        kind = name.split(":")[0]
        if (
            self.args.only
            and name != "build"
            and name not in self.args.only
            and kind + "s" not in self.args.only
        ):
            stages[name] = {"status": "skipped (--only)"}
            return
        if needs_s and self.left() < needs_s:
            stages[name] = {"status": f"skipped: {self.left():.0f} s of budget left"}
            self.log(f"{name}: skipped, {self.left():.0f} s of the budget left, needs ~{needs_s:.0f} s")
            return
        self.log(f"{name} ...")
        started = time.perf_counter()
        try:
            fn(self)
            status = "ok"
        except Exception as error:  # noqa: BLE001 - reported, then the next stage
            traceback.print_exc()
            status = f"error: {type(error).__name__}: {error}"[:500]
        seconds = time.perf_counter() - started
        stages[name] = {"status": status, "seconds": round(seconds, 1)}
        self.log(f"{name}: {status} in {seconds:.1f} s")
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_bench.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "gpu_bench.md").write_text(markdown(self.results))

    def before_compile(self, accel: AccelConfig) -> None:
        """A compile with other options than the last one starts from an empty dynamo cache: dynamo
        keeps every graph it compiled, up to its recompile limit, past which it runs the UNet
        eagerly without a word. A compile with the same options keeps the cache, so a variant that
        only changes what dynamo guards (a dtype, a layout, fused projections) compiles again, and
        one that changes nothing (another runner, other buckets) compiles nothing."""
        signature = compile_signature(accel)
        if signature is None:
            return
        if self.compiled_with is not None and signature != self.compiled_with:
            torch._dynamo.reset()
        self.compiled_with = signature


def meta(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:]),
        "device": str(device),
        "device_name": name,
        "peak_tflops": runs.peak_tflops(name) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "config": args.config,
        "size": args.size,
        "steps": args.steps,
        "guidance": runs.GUIDANCE,
    }


def flop_per_image(results: dict[str, Any], steps: int) -> float | None:
    flops = results.get("flops")
    if not flops:
        return None
    return flops["unet_cfg_step_flop"] * steps + flops["vae_decode_flop"]


def mfu(results: dict[str, Any], flop: float | None, seconds: float) -> float | None:
    peak = results["meta"]["peak_tflops"]
    if flop is None or peak is None or seconds <= 0:
        return None
    return flop / seconds / (peak * 1e12)


def timing_row(results: dict[str, Any], batch: int, timing: runs.Timing, totals: list[float]) -> dict:
    steps = results["meta"]["steps"]
    per_image = flop_per_image(results, steps)
    step_flop = results["flops"]["unet_cfg_step_flop"] * batch if results.get("flops") else None
    return {
        "batch": batch,
        "images_per_s": batch / timing.total_s,
        "ms_per_step": timing.step_s * 1000,
        "mfu": mfu(results, per_image * batch if per_image else None, timing.total_s),
        "step_mfu": mfu(results, step_flop, timing.step_s),
        **timing.as_dict(),
        "totals_s": totals,
    }


# --- helpers of the stages -------------------------------------------------------------------------------


def prepared(bench: Bench, accel: AccelConfig) -> UNetRunner:
    """A runner of the model with `accel` (see Bench.before_compile for dynamo's cache)."""
    model, _ = bench.built()
    bench.before_compile(accel)
    return prepare(model, accel)


def set_variant(bench: Bench, variant: Variant) -> UNetRunner:
    """The model in the variant's dtypes and layout, its runner, and its VAE decoder in bench."""
    model, master = bench.built()
    master.apply(model, variant.dtype, variant.vae_dtype)
    runner = prepared(bench, variant.accel)
    bench.vae_decoder = prepare_vae(model, variant.accel)  # None: vae.decode as it is
    return runner


def time_ours(
    bench: Bench, runner: UNetRunner, batch: int, repeats: int, peak: PeakMemory | None = None
) -> tuple[runs.Timing, list[float], torch.Tensor]:
    """Timing, and the final latents of the warm-up run (2 steps: capture, autotune, compile).
    `peak` measures the timed runs only: cuDNN's autotuning in the warm-up may try workspaces as
    large as the free memory."""
    model, _ = bench.built()
    args, decoder = bench.args, bench.vae_decoder
    _, latents = runs.run_ours(model, runner, batch, args.size, min(2, args.steps), vae_decoder=decoder)
    with peak or contextlib.nullcontext():
        timing, totals = runs.repeat(
            lambda: runs.run_ours(model, runner, batch, args.size, args.steps, vae_decoder=decoder)[0],
            repeats,
        )
    return timing, totals, latents


def relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    latents, reference = latents.float(), reference.float()
    return ((latents - reference).norm() / reference.norm()).item()


# --- the stages, in the order they run ---------------------------------------------------------------------


def build(bench: Bench) -> None:
    """SD 1.5's architecture (or --config's) with seeded random weights on the device, its float32
    master weights, and the FLOPs of a CFG step and a decode (the published ones at 512x512)."""
    args = bench.args
    model = runs.build_ours(args.config, args.device, FP32, FP32)
    model.keep_float32_decoder()  # the worker keeps it beside a float16 VAE; stays float32
    # fused and split again (bit for bit): the modules as every later split leaves them, so that
    # dynamo sees the same modules before and after the fused variant and need not compile again
    fuse_attention_projections(model)
    fuse_attention_projections(model, fuse=False)
    bench.model, bench.master = model, MasterWeights(model)
    counted = runs.count_flops(model, args.size)
    nominal = args.config == "sd15" and args.size == 512
    bench.results["flops"] = {
        "unet_cfg_step_flop": runs.SD15_UNET_CFG_STEP_FLOP if nominal else counted["unet_cfg_step_flop"],
        "vae_decode_flop": runs.SD15_VAE_DECODE_FLOP if nominal else counted["vae_decode_flop"],
        "source": "published SD 1.5 figures" if nominal else "counted",
        "counted": counted,
    }
    bench.log(
        f"FLOPs per CFG step {counted['unet_cfg_step_flop'] / 1e9:.1f} G, per decode "
        f"{counted['vae_decode_flop'] / 1e9:.1f} G (counted by torch.utils.flop_counter)"
    )


def precision(bench: Bench) -> None:
    """Final latents of 2 images in float16 (eager, then the fast path) and bfloat16 against
    float32 without TF32: relative error, pass at <= 1e-2 for float16."""
    model, master = bench.built()
    args, batch = bench.args, 2
    set_backend_flags(bench, AccelConfig())  # float32 reference without TF32
    master.apply(model, FP32, FP32)
    _, reference = runs.run_ours(model, None, batch, args.size, args.steps)
    bench.fp32_latents = reference
    rows = {}
    for name, dtype, accel in (
        ("float16 eager", FP16, None),
        ("float16 fast path", FP16, bench.fast),
        ("bfloat16 eager", BF16, None),  # 3 fewer mantissa bits: for information, no bar
    ):
        master.apply(model, dtype, FP32)
        runner = prepared(bench, accel) if accel is not None else None
        _, latents = runs.run_ours(model, runner, batch, args.size, args.steps)
        error = relative_error(latents, reference)
        rows[name] = {"relative_error": error, "pass": error <= 1e-2 if dtype == FP16 else None}
        if name == "float16 eager":
            bench.fp16_latents = latents
        prepare(model, AccelConfig())  # back to contiguous, strict float32 for the next one
        del runner
        free_memory()
    bench.results["precision"] = {"batch": batch, "steps": args.steps, "rows": rows}
    for name, row in rows.items():
        verdict = {True: "pass", False: "FAIL", None: "no bar"}[row["pass"]]
        bench.log(f"{name}: relative error of the final latents {row['relative_error']:.2e} ({verdict})")


def vae(bench: Bench) -> None:
    """The decode alone, as the engine runs it (--vae-batch latents a call, backend flags as the
    fast path sets them): float32 against float16 VAE, channels_last against contiguous, eager
    against the compiled decoder (SD_COMPILE_VAE), pixels against the float32 decode's. Each row is
    kept as soon as it is measured; one that fails is recorded and the others go on. Then the
    float32 fallback on latents that overflow a float16 decode."""
    model, master = bench.built()
    args, fast = bench.args, bench.fast
    set_backend_flags(bench, fast)
    generator = torch.Generator(device="cpu").manual_seed(7)
    shape = (args.ablation_batch, model.latent_channels, args.size // 8, args.size // 8)
    timed = torch.randn(shape, generator=generator).to(model.device)
    # real denoised latents when the precision stage made them (pixels compared on those)
    picture = (bench.fp32_latents if bench.fp32_latents is not None else timed[:2]).to(model.device)
    rows: list[dict[str, Any]] = []
    bench.results["vae"] = {"rows": rows}
    reference: dict[str, Any] = {}
    last = fast.channels_last
    for name, vae_dtype, channels_last, compiled in (
        ("float32", FP32, last, False),  # the pixels' reference
        ("float16", FP16, last, False),
        ("float16, other layout", FP16, not last, False),
        ("float16, decoder compiled", FP16, last, True),
    ):
        row: dict[str, Any] = {
            "vae_dtype": name,
            "layout": "channels_last" if channels_last else "contiguous",
            "latents": shape[0],
            "per_call": args.vae_batch,
        }
        try:
            row |= decode_timing(bench, timed, picture, reference, vae_dtype, channels_last, compiled)
        except Exception as error:  # noqa: BLE001 - recorded, then the next row
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {error}"[:300]
            free_memory()
        rows.append(row)
        bench.log(f"VAE {row}")
        bench.save()
    set_memory_format(model, fast.channels_last, fast.vae_channels_last)
    bench.results["vae"]["fallback"] = vae_fallback(bench, picture)
    bench.log(f"VAE fallback on latents x10000: {bench.results['vae']['fallback']}")
    master.apply(model, bench.half, bench.default.vae_dtype)


def decode_timing(
    bench: Bench,
    latents: torch.Tensor,
    picture: torch.Tensor,
    reference: dict[str, Any],
    vae_dtype: torch.dtype,
    channels_last: bool,
    compiled: bool,
) -> dict[str, Any]:
    """One row of the vae stage: the decode of `latents` in --vae-batch chunks, first pass (cuDNN's
    autotuning, the compile) then the median of 5 (1 on the CPU); `picture`'s pixels against
    reference["pixels"] (set by the first row)."""
    model, master = bench.built()
    master.apply(model, bench.half, vae_dtype)
    set_memory_format(model, bench.fast.channels_last, channels_last)
    decoder = None
    if compiled:
        accel = dataclasses.replace(bench.fast, compile_vae=True)
        bench.before_compile(accel)
        decoder = VAEDecoder(model.vae, accel)
    pipeline = Pipeline(model, vae_decoder=decoder)

    def decode_all() -> None:
        for chunk in latents.split(bench.args.vae_batch):
            pipeline.decode_latents(chunk)

    started = time.perf_counter()
    decode_all()
    first_s = time.perf_counter() - started
    seconds = []
    for _ in range(5 if model.device.type == "cuda" else 1):  # the CPU check: the plumbing
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        decode_all()
        seconds.append(time.perf_counter() - started)
    pixels = pipeline.decode_latents(picture).astype("int16")
    difference = abs(pixels - reference.setdefault("pixels", pixels))
    median = sorted(seconds)[len(seconds) // 2]
    return {
        "first_s": first_s,
        "s": median,
        "ms_per_image": 1000 * median / latents.shape[0],
        "max_level_diff": int(difference.max()),
        "mean_level_diff": float(difference.mean()),
        "share_off_by_more_than_1": float((difference > 1).mean()),
    }


def vae_fallback(bench: Bench, picture: torch.Tensor) -> dict[str, int]:
    """Latents x10,000 overflow a float16 decode (beyond 65504 once unscaled): the float32 fallback
    must take over and give the float32 decode's pixels."""
    model, master = bench.built()
    pipeline = Pipeline(model)
    huge = picture * 1e4
    master.apply(model, bench.half, FP32)
    expected = pipeline.decode_latents(huge)
    master.apply(model, bench.half, FP16)
    raw = model.vae.decode((huge / model.vae.config.scaling_factor).half())
    got = pipeline.decode_latents(huge)
    return {
        "latents": huge.shape[0],
        "float16_decodes_overflowed": int((~raw.isfinite().flatten(1).all(dim=1)).sum()),
        "fallback_max_level_diff_vs_float32": int(abs(got.astype("int16") - expected).max()),
    }


def ours(bench: Bench) -> None:
    """Each of --batches one-image requests through the Pipeline as the engine drives it, on the
    worker's defaults: images/s, ms per step, MFU, GPU memory (weights + peak above them)."""
    model, _ = bench.built()
    runner = set_variant(bench, bench.default)
    rows = bench.results.setdefault("ours", [])
    weights = weight_bytes(model.unet, model.vae, model.text_encoder, model.vae_fallback)
    for batch in bench.args.batches:
        peak = PeakMemory(weights)
        timing, totals, _ = time_ours(bench, runner, batch, bench.args.repeats, peak)
        rows.append({**timing_row(bench.results, batch, timing, totals), "peak_gb": peak.gb})
        bench.log(
            f"ours batch {batch}: {batch / timing.total_s:.3f} images/s, {timing.step_s * 1000:.1f} ms/step"
        )
    bench.results["ours_runner"] = dataclasses.asdict(runner.stats())
    runner.release()  # its graphs' memory, before diffusers and the worker need theirs
    free_memory()


def kernels(bench: Bench) -> None:
    """Where the compiled UNet call of --kernel-rows rows (32: batch 16 with CFG) spends its device
    time, by kind of kernel (convolution, GEMM, attention, elementwise/normalization, other; from
    torch.profiler's kernel names, gpu_runs.kernel_kind). The default fast path's compiled graph is
    profiled outside a CUDA graph, whose replay could hide its kernels from the profiler; the same
    call replayed in its graph is timed beside it (the difference: launch gaps the graph removes)."""
    model, _ = bench.built()
    rows, size = bench.args.kernel_rows, bench.args.size
    in_graphs = set_variant(bench, bench.default)
    # the same compile (dynamo's cache has it): the graph run as it is
    plain = prepared(bench, dataclasses.replace(bench.default.accel, cuda_graphs=False))
    result = runs.kernel_profile(plain, model, rows, size)
    result["graph_call_ms"] = runs.time_unet_call(in_graphs, model, rows, size)
    bench.results["kernels"] = result
    for kind in result["kinds"]:
        bench.log(
            f"{kind['kind']:>26}: {kind['ms_per_call']:7.2f} ms {kind['share']:6.1%}  {kind['largest']}"
        )
    bench.log(
        f"kernels {result['ms_per_call']:.2f} ms a call; in its CUDA graph {result['graph_call_ms']:.2f} ms"
    )
    for runner in (plain, in_graphs):
        runner.release()
    free_memory()


def buckets(bench: Bench) -> None:
    """One UNet call of the fast path at each of --bucket-rows rows, padded to its bucket: the
    default buckets against --fine-buckets (median device time of 5 calls each). Padding rows cost
    what real rows cost, so this is what finer buckets save on a call between two default buckets."""
    model, _ = bench.built()
    size = bench.args.size
    calls = 5 if bench.device.type == "cuda" else 1  # the CPU check: the plumbing, not a figure
    default = set_variant(bench, bench.default)
    fine = prepared(bench, dataclasses.replace(bench.default.accel, buckets=bench.args.fine_buckets))
    rows = []
    for count in bench.args.bucket_rows:
        row: dict[str, Any] = {"rows": count}
        for name, runner in (("default", default), ("fine", fine)):
            row[f"{name}_bucket"] = runner.config.bucket(count)
            row[f"{name}_ms"] = runs.time_unet_call(runner, model, count, size, calls)
        row["fine_speedup"] = row["default_ms"] / row["fine_ms"]
        rows.append(row)
        bench.log(f"buckets: {row}")
    bench.results["buckets"] = {
        "default": list(default.config.buckets),
        "fine": list(bench.args.fine_buckets),
        "calls": calls,
        "rows": rows,
        "captures": {"default": default.stats().captures, "fine": fine.stats().captures},
    }
    for runner in (default, fine):
        runner.release()
    free_memory()


def diffusers(bench: Bench) -> None:
    """diffusers' StableDiffusionPipeline on the same weights, prompts and seeds: how close its final
    latents are to ours (float32 and float16), then each of --batches timed as ours was."""
    model, master = bench.built()
    args = bench.args
    prepare(model, AccelConfig())  # diffusers gets plain contiguous weights
    torch_default_flags(bench)  # and PyTorch's stock backend settings
    if bench.fp32_latents is not None:  # float32 both sides: the pipelines' agreement without rounding
        torch_default_flags(bench, cudnn_tf32=False)
        master.apply(model, FP32, FP32)
        pipe = runs.build_diffusers(model, args.config, FP32)
        diffusers_agreement(bench, "diffusers_vs_ours_fp32", pipe, "float32", bench.fp32_latents)
        del pipe
        torch_default_flags(bench)
    master.apply(model, bench.half, FP32)
    pipe = runs.build_diffusers(model, args.config, bench.half)
    if bench.fp16_latents is not None:  # same weights, seeds and dtype: how close are the two pipelines?
        diffusers_agreement(bench, "diffusers_vs_ours_fp16", pipe, args.dtype, bench.fp16_latents)
    rows = bench.results.setdefault("diffusers", [])
    weights = weight_bytes(pipe.unet, pipe.vae, pipe.text_encoder)
    for batch in args.batches:
        runs.run_diffusers(pipe, batch, args.size, min(2, args.steps))  # warm-up, not measured
        with PeakMemory(weights) as peak:
            timing, totals = runs.repeat(
                lambda b=batch, p=pipe: runs.run_diffusers(p, b, args.size, args.steps)[0],
                args.diffusers_repeats,
            )
        rows.append({**timing_row(bench.results, batch, timing, totals), "peak_gb": peak.gb})
        bench.log(
            f"diffusers batch {batch}: {batch / timing.total_s:.3f} images/s, {timing.step_s * 1000:.1f} ms/step"
        )
    del pipe
    free_memory()


def diffusers_agreement(bench: Bench, key: str, pipe: Any, dtype_name: str, reference: torch.Tensor) -> None:
    """How close diffusers' final latents are to ours: same weights, seeds, prompts."""
    _, latents = runs.run_diffusers(pipe, 2, bench.args.size, bench.args.steps, output_type="latent")
    bench.results[key] = {
        "diffusers_dtype": dtype_name,
        "relative_error": relative_error(latents, reference),
        "finite": bool(latents.isfinite().all()),
        "norms": [latents.float().norm().item(), reference.float().norm().item()],
    }
    bench.log(f"{key}: final latents {bench.results[key]['relative_error']:.2e} apart ({bench.results[key]})")


def engine(bench: Bench) -> None:
    """Each --engine-requests load through the real engine on the worker's defaults."""
    engine_loads(bench, bench.fast)


def engine_loads(
    bench: Bench, accel: AccelConfig, label: str | None = None, vae_dtype: torch.dtype | None = None
) -> None:
    """Each --engine-requests load through the real engine with this fast path. With compile,
    only the loads' own buckets are compiled, not every bucket."""
    model, _ = bench.built()
    args = bench.args
    vae_dtype = vae_dtype or bench.default.vae_dtype
    runner = set_variant(bench, Variant(label or "fast", label or "fast", bench.half, vae_dtype, accel))
    rows = bench.results.setdefault("engine", [])
    for requests in args.engine_requests:
        row = runs.run_engine(
            model,
            runner,
            requests,
            args.size,
            args.steps,
            args.max_rows,
            args.vae_batch,
            warm_all_buckets=accel.compile_mode == "off",
            vae_decoder=bench.vae_decoder,
        )
        flop = _times(flop_per_image(bench.results, args.steps), row["requests"])
        row["mfu"] = mfu(bench.results, flop, row["span_s"])
        row["runner"] = dataclasses.asdict(runner.stats())
        if label:
            row["label"] = label
        rows.append(row)
        tail = row["tail"].get("after_last_unet_s")
        bench.log(
            f"{label or 'engine'}, {requests} requests at once: {row['images_per_s']:.3f} images/s, "
            f"{tail if tail is None else round(tail, 3)} s from the last UNet call to the last PNG"
        )
    runner.release()
    free_memory()


def worker(bench: Bench) -> None:
    """The real worker process on a private Redis, --worker-requests jobs at once (worker_env)."""
    model, master = bench.built()
    args = bench.args
    master.apply(model, bench.half, FP32)
    free_memory()  # the worker process needs its own GPU memory
    env = worker_env(bench)
    log_path = bench.out / "worker.log" if bench.out else None  # kept even if the run is cut short
    if bench.out:
        bench.out.mkdir(parents=True, exist_ok=True)
    row = runs.run_worker(
        model,
        args.config,
        args.device,
        args.worker_requests,
        args.size,
        args.steps,
        args.max_rows,
        env,
        log_path,
    )
    span_s = row["requests"] / row["images_per_s"]
    row["mfu"] = mfu(
        bench.results, _times(flop_per_image(bench.results, args.steps), row["requests"]), span_s
    )
    bench.results["worker"] = row
    bench.log(
        f"worker {env}, {row['requests']} requests at once: {row['images_per_s']:.3f} images/s "
        f"(ready {row['start_s']:.0f} s after its start)"
    )


def worker_env(bench: Bench) -> dict[str, str]:
    """The worker's environment: INFO logs (its warm-up and graph captures) and any recompile with
    its reason; with --worker-compile, the fast path of this run's fastest dynamic-batch ablation
    (a static compile of all nine buckets takes minutes of start-up), else of its fastest compiled
    one, set as an operator would."""
    env = {"SD_LOG_LEVEL": "INFO", "TORCH_LOGS": "recompiles"}
    compiled = [row for row in bench.results.get("ablations", []) if row.get("compiled")]
    if not (bench.args.worker_compile and compiled):
        return env
    dynamic = [row for row in compiled if bench.variants[row["key"]].accel.compile_dynamic_batch]
    best = bench.variants[max(dynamic or compiled, key=lambda row: row["images_per_s"])["key"]]
    accel = best.accel
    env |= {
        "SD_VAE_DTYPE": str(best.vae_dtype).removeprefix("torch."),
        "SD_COMPILE": accel.compile_mode,
        "SD_CHANNELS_LAST": str(accel.channels_last).lower(),
        "SD_COMPILE_DYNAMIC_BATCH": str(accel.compile_dynamic_batch).lower(),
        "SD_COMPILE_CONV_1X1_AS_MM": str(accel.compile_conv_1x1_as_mm).lower(),
        "SD_COMPILE_AUTOTUNE_MATMULS": str(accel.compile_autotune_matmuls).lower(),
        "SD_COMPILE_VAE": str(accel.compile_vae).lower(),
        "SD_FUSE_PROJECTIONS": str(accel.fuse_projections).lower(),
    }
    if accel.vae_channels_last is not None:
        env["SD_VAE_CHANNELS_LAST"] = str(accel.vae_channels_last).lower()
    if accel.buckets != DEFAULT_BUCKETS:
        env["SD_CUDA_GRAPH_BUCKETS"] = ",".join(str(rows) for rows in accel.buckets)
    return env


def ablation(bench: Bench, variant: Variant) -> None:
    """One variant at --ablation-batch: images/s, ms per step, graph captures, and how far its
    2-step latents are from the first ablation's (outputs kept?)."""
    args = bench.args
    runner = set_variant(bench, variant)
    timing, totals, latents = time_ours(bench, runner, args.ablation_batch, args.ablation_repeats)
    row = timing_row(bench.results, args.ablation_batch, timing, totals)
    row.update(
        key=variant.key,
        name=variant.name,
        captures=runner.stats().captures,
        compiled=variant.accel.compile_mode != "off",
    )
    if bench.ablation_latents is None:
        bench.ablation_latents = latents.float()
    row["vs_default_relative_error"] = relative_error(latents, bench.ablation_latents)
    bench.results.setdefault("ablations", []).append(row)
    bench.log(
        f"{variant.name}: {row['images_per_s']:.3f} images/s, {row['ms_per_step']:.1f} ms/step, "
        f"latents {row['vs_default_relative_error']:.1e} from the first ablation's"
    )
    runner.release()
    free_memory()


def profile(bench: Bench) -> None:
    """Where one eager UNet call of --ablation-batch images spends its time: the top kernels (or CPU
    ops) by self time, with the default's kernel choices (eager names every op)."""
    model, master = bench.built()
    master.apply(model, bench.half, FP32)
    prepare(
        model, dataclasses.replace(bench.fast, cuda_graphs=False, compile_mode="off", channels_last=False)
    )
    result = runs.profile_unet(model, 2 * bench.args.ablation_batch, bench.args.size, top=25)
    bench.results["profile"] = result
    for row in result["top"][:10]:
        bench.log(f"{row['share']:6.1%} {row['ms_per_call']:8.2f} ms  {row['name'][:90]}")


def engine_compiled(bench: Bench) -> None:
    """The engine loads with the fastest torch.compile variant of this run's ablations (default
    mode if none ran)."""
    accel = dataclasses.replace(
        bench.fast, compile_mode="default", compile_backend=bench.args.compile_backend
    )
    label, vae_dtype = "engine + torch.compile", bench.default.vae_dtype
    compiled = [row for row in bench.results.get("ablations", []) if row.get("compiled")]
    if compiled:
        best = bench.variants[max(compiled, key=lambda row: row["images_per_s"])["key"]]
        accel, label, vae_dtype = best.accel, f"engine, {best.name}", best.vae_dtype
    engine_loads(bench, accel, label, vae_dtype)


def chosen_ablations(bench: Bench) -> list[Variant]:
    """--ablations in the bench's order; by default every variant but the extra ones, and the slow
    ones only with --slow-ablations."""
    args = bench.args
    if args.ablations is not None:
        return [variant for variant in bench.variants.values() if variant.key in args.ablations]
    return [v for v in bench.variants.values() if not v.extra and (args.slow_ablations or not v.slow)]


def plan(bench: Bench) -> list[tuple[str, Stage, float]]:
    """The stages after the build, in order, each with its rough cost in seconds (0: always run)."""
    args = bench.args
    cuda = args.device.startswith("cuda")
    first: list[tuple[str, Stage, float]] = [
        ("precision", precision, 0.0),
        ("vae", vae, 0.0),
        ("ours", ours, 0.0),
        ("kernels", kernels, args.est_kernels_s),
        ("buckets", buckets, args.est_buckets_s),
        ("diffusers", diffusers, 0.0),
        ("engine", engine, args.est_engine_s),
    ]
    on_worker = [("worker", worker, args.est_worker_s * (1.5 if args.worker_compile else 1))]
    scale = 1.0 if cuda else args.est_ablation_s / 15
    later: list[tuple[str, Stage, float]] = [
        (f"ablation: {variant.name}", functools.partial(ablation, variant=variant), variant.needs_s * scale)
        for variant in chosen_ablations(bench)
    ]
    if args.profile:
        later.append(("profile", profile, 20))
    if args.engine_compile:
        later.append(
            ("engine: compiled", engine_compiled, args.est_engine_s + 20 * len(args.engine_requests))
        )
    later.append(("sdxl", gpu_sdxl.stage, args.est_sdxl_s))
    if args.lora:  # last: it installs a LoRA pool on the bench's model
        later.append(("lora", lora_bench.stage, args.est_lora_s))
    # Stages of features still to come (samplers at equal quality) go here, each one function over
    # Bench with its --skip name and rough cost.
    # The worker runs on its defaults before the ablations (their compiles take minutes), unless it
    # is to take the fastest compiled ablation (--worker-compile).
    return first + (later + on_worker if args.worker_compile else on_worker + later)


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench.create(args)
    note = "" if bench.device.type == "cuda" else " (CPU: no graph capture, the bucketed path runs eagerly)"
    bench.log(f"{bench.results['meta']['device_name']} | torch {torch.__version__} | {args.config}{note}")
    bench.stage("build", build)
    if bench.model is not None:
        for name, fn, needs_s in plan(bench):
            bench.stage(name, fn, needs_s)
    bench.results["elapsed_s"] = round(bench.elapsed(), 1)
    bench.save()
    print()
    print(markdown(bench.results))
    return bench.results


# --- small helpers -----------------------------------------------------------------------------------------


def weight_bytes(*modules: torch.nn.Module | None) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


class PeakMemory:
    """GPU memory a pipeline needs for a batch: its weights plus the peak allocated above what was
    allocated on entry (activations, workspaces, graph pools captured meanwhile). The bench keeps
    other things on the GPU (float32 master weights), so the process's own peak would overstate it."""

    def __init__(self, weights: int) -> None:
        self.weights = weights
        self.gb: float | None = None

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.gb = (torch.cuda.max_memory_allocated() - self.base + self.weights) / 1e9


def _times(flop: float | None, count: int) -> float | None:
    return None if flop is None else flop * count


def set_backend_flags(bench: Bench, config: AccelConfig) -> None:
    """The process-wide TF32 and cuDNN switches of `config`, on a GPU only (as prepare() sets them):
    dynamo guards on them, so flipping them on the CPU, where they change nothing, would only make
    every compiled graph compile again."""
    if bench.device.type == "cuda":
        apply_backend_flags(config)


def torch_default_flags(bench: Bench, cudnn_tf32: bool = True) -> None:
    """PyTorch's own defaults on a GPU: no TF32 for matmuls, TF32 for cuDNN convs (unless
    `cudnn_tf32` is False), no cuDNN autotuning."""
    if bench.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.backends.cudnn.benchmark = False


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny config on the CPU, a few steps: a check")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --quick)")
    parser.add_argument(
        "--config", choices=["sd15", "tiny"], default=None, help="default: sd15 (tiny with --quick)"
    )
    parser.add_argument("--size", type=int, help="pixels per side (default 512; 64 with --quick)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50; 4 with --quick)")
    parser.add_argument("--batches", type=int, nargs="+", help="images per batch (default 1 4 8 16)")
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="UNet dtype (default float16; float32 --quick)",
    )
    parser.add_argument("--repeats", type=int, help="timed runs per batch, median (default 3)")
    parser.add_argument("--diffusers-repeats", type=int, help="default: --repeats")
    parser.add_argument("--max-rows", type=int, default=64, help="UNet rows per call (the worker's default)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --quick)")
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--budget-s", type=float, help="skip optional stages past this (default 420)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="stages to skip: precision vae ours kernels buckets diffusers engine worker ablations sdxl",
    )
    parser.add_argument(
        "--only", nargs="*", default=[], help="run only these stages (the build always runs), e.g. sdxl"
    )
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_bench.json/.md")
    add_stage_arguments(parser)
    return parser


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of single stages: ablations, engine and worker loads, kernels, buckets."""
    parser.add_argument("--ablation-batch", type=int, help="default 16 (2 with --quick)")
    parser.add_argument("--ablation-repeats", type=int, default=1)
    parser.add_argument(
        "--ablations",
        nargs="*",
        choices=[v.key for v in ablations(FAST_CUDA, FP16, "inductor")],
        help="run only these ablations, in the bench's order (default: all but buckets-fine; slow ones "
        "per --slow-ablations)",
    )
    parser.add_argument(
        "--slow-ablations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="math attention, float32 UNet, torch.compile (last, budget permitting)",
    )
    parser.add_argument(
        "--compile-backend", help="torch.compile backend (default inductor; eager with --quick)"
    )
    parser.add_argument(
        "--engine-requests", type=int, nargs="+", help="jobs at once, one engine run each (default 16 32)"
    )
    parser.add_argument("--worker-requests", type=int, help="default: the largest --engine-requests")
    parser.add_argument(
        "--kernel-rows",
        type=int,
        help="rows of the profiled compiled UNet call (default: 2x the largest batch)",
    )
    parser.add_argument(
        "--fine-buckets",
        type=int,
        nargs="+",
        help="the finer CUDA-graph buckets of the buckets stage and of the buckets-fine ablation (default "
        "1 2 4 8 16 24 32 40 48 56 64; with 6 too on --quick, whose CPU-compiled graph holds at most 15 rows)",
    )
    parser.add_argument(
        "--bucket-rows",
        type=int,
        nargs="+",
        help="UNet rows timed with the default and the finer buckets (default 34 40 50 56 64; 5 --quick)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one eager UNet call: its top kernels by time (~10 s)"
    )
    parser.add_argument(
        "--engine-compile",
        action="store_true",
        help="also run the engine loads with torch.compile in the graphs (~1 minute of compile per load)",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="stage lora (bench/lora_bench.py): one UNet call with --lora-rows rows across --lora-count "
        "LoRAs of rank --lora-rank against the same call without (goal <= 1.15x), on the default fast path",
    )
    parser.add_argument("--lora-rows", type=int, default=None, help="default 16 (8 --quick)")
    parser.add_argument("--lora-count", type=int, default=None, help="default 8 (4 --quick)")
    parser.add_argument("--lora-rank", type=int, default=None, help="default 32 (16 --quick)")
    parser.add_argument(
        "--lora-repeats", type=int, default=None, help="timed calls per case (default 50; 5 --quick)"
    )
    parser.add_argument(
        "--worker-compile",
        action="store_true",
        help="run the worker with the fastest torch.compile variant of the ablations (SD_COMPILE...)",
    )
    parser.add_argument("--sdxl-config", choices=["sdxl", "tiny"], help="default sdxl (tiny with --quick)")
    parser.add_argument("--sdxl-size", type=int, help="pixels per side (default 1024; 64 with --quick)")
    parser.add_argument("--sdxl-steps", type=int, help="Euler steps (default 30; 3 with --quick)")
    parser.add_argument("--sdxl-batches", type=int, nargs="+", help="default 1 4 8 (1 2 with --quick)")
    parser.add_argument(
        "--sdxl-accel",
        choices=["default", "graphs"],
        default="default",
        help="ours: the worker's default fast path (compiled in CUDA graphs) or CUDA graphs alone",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the defaults of a full GPU run or of --quick for those not given."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "device": "cpu" if quick else "cuda",
        "config": "tiny" if quick else "sd15",
        "size": 64 if quick else 512,
        "steps": 4 if quick else 50,
        "batches": [1, 2] if quick else [1, 4, 8, 16],
        "repeats": 1 if quick else 3,
        "ablation_batch": 2 if quick else 16,
        "compile_backend": "eager" if quick else "inductor",
        "dtype": "float32" if quick else "float16",  # half precision crawls on most CPUs
        "engine_requests": [4] if quick else [16, 32],
        "bucket_rows": [5] if quick else [34, 40, 50, 56, 64],
        "fine_buckets": sorted({*FINE_BUCKETS, 6}) if quick else list(FINE_BUCKETS),
        "budget_s": 600 if quick else 420,
        "slow_ablations": not quick,
        "sdxl_config": "tiny" if quick else "sdxl",
        "sdxl_size": 64 if quick else 1024,
        "sdxl_steps": 3 if quick else 30,
        "sdxl_batches": [1, 2] if quick else [1, 4, 8],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.worker_requests = args.worker_requests or max(args.engine_requests)
    args.diffusers_repeats = args.diffusers_repeats or args.repeats
    args.kernel_rows = args.kernel_rows or 2 * max(args.batches)
    args.fine_buckets = tuple(args.fine_buckets)
    # rough costs used to skip optional stages when the budget runs short (seconds, H100)
    args.est_engine_s = (5 if quick else 20) * len(args.engine_requests)
    args.est_worker_s = 20 if quick else 75
    args.est_ablation_s = 2 if quick else 15
    args.est_kernels_s = 2 if quick else 15
    args.est_buckets_s = 2 if quick else 25
    # SDXL: build, a compile of its UNet, 3 batches x (warm-up + repeats) both sides
    args.est_sdxl_s = 10 if quick else (240 if args.sdxl_accel == "default" else 150)
    # LoRA: the default fast path compiled again with the pool's layers, four cases captured
    args.est_lora_s = 5 if quick else 150
    args.lora_rows = args.lora_rows or (8 if quick else 16)
    args.lora_count = args.lora_count or (4 if quick else 8)
    args.lora_rank = args.lora_rank or (16 if quick else 32)
    args.lora_repeats = args.lora_repeats or (5 if quick else 50)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --quick (or --device cpu --config tiny) for the CPU check")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads or args.quick:
        # one thread on a small shared CPU: OpenMP threads spin-waiting on busy cores make the tiny
        # model 10-100x slower at random
        torch.set_num_threads(args.threads or 1)
    results = run(args)
    failed = [k for k, v in results["stages"].items() if v["status"].startswith("error")]
    measured = "ours" in results or "sdxl" in results  # none: the build failed, or --only ran nothing
    return 1 if failed or not measured else 0


if __name__ == "__main__":
    sys.exit(main())
