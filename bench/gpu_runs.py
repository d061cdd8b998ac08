"""The measurements of bench/gpu.py: build the models, time one batch through our engine path or
diffusers' pipeline, count FLOPs, run the engine or a real worker on a stream of requests.

Timing: CUDA events on a GPU (`Clock`), perf_counter on the CPU; every figure is the median of
repeats after a warm-up (which also captures the CUDA graphs and runs cuDNN's autotuning).
"""

from __future__ import annotations

import logging
import re
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.accel import UNetRunner
from models.configs import UNetConfig, VAEConfig
from models.loading import SINGLE_FILE_CONFIGS, TOKENIZER_ASSETS, load_tokenizer, read_component_configs
from models.noise_schedule import NoiseSchedule
from models.pipeline import ActiveImage, Picture, Pipeline
from models.stable_diffusion import StableDiffusion
from models.tiny_configs import TOKENIZER_PAD_TOKEN, tiny_config
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL
from schemas.generation import Generation
from workers.batching import split_rows

if TYPE_CHECKING:
    from schemas.queue import JobResult
    from workers.submission import Submission

GUIDANCE = 7.5
NEGATIVE = "blurry, low quality"
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a lighthouse at dusk, oil painting",
    "a red circle in the top left on a blue background",
    "a bowl of ramen, studio lighting, 35mm",
]
# Published cost of SD 1.5 at 512x512 (FLOP): one CFG step (2 UNet rows), one decode
SD15_UNET_CFG_STEP_FLOP = 1.61e12
SD15_VAE_DECODE_FLOP = 2.5e12
# Dense fp16/bf16 tensor-core peaks (vendor datasheets, TFLOP/s), matched on the driver's name
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS if all(k in device_name for k in key.split())), None)


def component_configs(name: str) -> dict[str, dict[str, Any]]:
    if name == "tiny":
        return tiny_config("sd1")
    if name == "sd15":
        return read_component_configs(SINGLE_FILE_CONFIGS["sd1"])
    raise ValueError(f"config must be tiny or sd15, got {name!r}")


def build_ours(
    config: str, device: str, dtype: torch.dtype, vae_dtype: torch.dtype, seed: int = 0
) -> StableDiffusion:
    """Our model with seeded random weights (PyTorch's and transformers' default init), built
    directly on `device`: the same seed gives the same weights on the same device."""
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = component_configs(config)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]))
        vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    model = StableDiffusion(
        f"{config}-random",
        unet,
        vae,
        text_encoder,
        load_tokenizer(TOKENIZER_ASSETS),
        NoiseSchedule.from_config(configs["scheduler"]),
    )
    return model.to(device=device, dtype=dtype, vae_dtype=vae_dtype).eval()


def build_diffusers(model: StableDiffusion, config: str, dtype: torch.dtype) -> Any:
    """diffusers' StableDiffusionPipeline (DDIM, its default SDPA attention, VAE in `dtype` as it
    ships) on the same device, with the same weights and text encoder as `model`."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as DiffusersUNet

    configs = component_configs(config)
    with torch.device(model.device):
        unet = DiffusersUNet(**{k: v for k, v in configs["unet"].items() if not k.startswith("_")})
        vae = DiffusersVAE(**{k: v for k, v in configs["vae"].items() if not k.startswith("_")})
    unet.load_state_dict(model.unet.state_dict())
    vae.load_state_dict(model.vae.state_dict())
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype).eval(),
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=unet.to(dtype).eval(),
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Clock:
    """Named time marks: CUDA events on a GPU (read after one synchronize), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        """Seconds from the first mark to each mark."""
        if self.cuda:
            torch.cuda.synchronize()
            first = self.marks[0][1]
            return {name: first.elapsed_time(event) / 1000 for name, event in self.marks}
        first = self.marks[0][1]
        return {name: t - first for name, t in self.marks}


@dataclass
class Timing:
    total_s: float  # prompts in, pixels out (uint8 on the host)
    text_s: float  # prompt encoding and initial noise
    step_s: float  # one denoising step, steady state: (last step end - first step end) / (steps - 1)
    decode_s: float

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("total_s", "text_s", "step_s", "decode_s")}


def _timing(marks: dict[str, float], steps: int) -> Timing:
    first, last = marks["step0"], marks[f"step{steps - 1}"]
    step_s = (last - first) / (steps - 1) if steps > 1 else first - marks["text"]
    return Timing(marks["end"], marks["text"], step_s, marks["end"] - last)


def batch_requests(batch: int, size: int, steps: int, sampler: str = "ddim") -> list[tuple[int, Generation]]:
    """`batch` one-image requests, as `batch` users would send them (CFG, own seeds and prompts)."""
    return [
        (
            i,
            Generation(
                prompt=f"{PROMPTS[i % len(PROMPTS)]}, number {i}",
                negative_prompt=NEGATIVE,
                width=size,
                height=size,
                steps=steps,
                guidance_scale=GUIDANCE,
                sampler=sampler,
                seed=1000 + i,
            ),
        )
        for i in range(batch)
    ]


def run_ours(
    model: StableDiffusion,
    runner: UNetRunner | None,
    batch: int,
    size: int,
    steps: int,
    max_rows: int = 64,
    vae_batch: int = 8,
    vae_decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sampler_name: str = "ddim",
) -> tuple[Timing, torch.Tensor]:
    """One batch through the Pipeline as the engine drives it (one call per <= max_rows rows per step,
    decode in chunks); returns the timing and the final latents (batch, C, h, w)."""
    sampler = Pipeline(model, unet_runner=runner, vae_decoder=vae_decoder)
    clock = Clock(model.device)
    clock.mark("start")
    requests = batch_requests(batch, size, steps, sampler_name)
    images = [image for group in sampler.start(requests) for image in group]
    clock.mark("text")
    for step in range(steps):
        for chunk in split_rows(images, max_rows):
            sampler.step(chunk)
        clock.mark(f"step{step}")
    latents = torch.cat([image.latent for image in images])
    sampler.decode(images, vae_batch)
    clock.mark("end")
    return _timing(clock.seconds(), steps), latents


def run_diffusers(
    pipe: Any, batch: int, size: int, steps: int, output_type: str = "np"
) -> tuple[Timing, Any]:
    """One batch through diffusers' pipeline: the same prompts, seeds (a list of CPU generators) and
    guidance as run_ours."""
    requests = [r for _, r in batch_requests(batch, size, steps)]
    clock = Clock(pipe.unet.device)

    def on_step_end(_pipe: Any, step: int, _t: Any, kwargs: dict) -> dict:
        clock.mark(f"step{step}")
        return kwargs

    clock.mark("start")
    clock.mark("text")  # diffusers encodes inside the call: its text time counts in the first step
    out = pipe(
        prompt=[r.prompt for r in requests],
        negative_prompt=[r.negative_prompt for r in requests],
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
        output_type=output_type,
        callback_on_step_end=on_step_end,
    )
    clock.mark("end")
    return _timing(clock.seconds(), steps), out.images


def median_timing(timings: list[Timing]) -> Timing:
    return Timing(
        *(
            statistics.median(getattr(t, k) for t in timings)
            for k in ("total_s", "text_s", "step_s", "decode_s")
        )
    )


def repeat(fn: Callable[[], Timing], repeats: int) -> tuple[Timing, list[float]]:
    timings = [fn() for _ in range(repeats)]
    return median_timing(timings), [t.total_s for t in timings]


def unet_inputs(
    model: StableDiffusion, rows: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs of one UNet call of `rows` rows at `size` pixels, as the Pipeline passes them
    (the same dtypes, or a compiled UNet would compile again for these): sample (rows, C, h, w) and
    context (rows, 77, D) in the UNet's dtype, timesteps (rows,) float32."""
    f = model.vae_scale_factor
    device, dtype = model.device, model.dtype
    sample = torch.randn((rows, model.latent_channels, size // f, size // f), device=device, dtype=dtype)
    context = torch.randn((rows, 77, model.text_encoder.config.hidden_size), device=device, dtype=dtype)
    return sample, torch.full((rows,), 500.0, device=device), context


@torch.no_grad()
def count_flops(model: StableDiffusion, size: int) -> dict[str, float]:
    """FLOPs of one CFG step (2 UNet rows) and one VAE decode at `size`, counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    sample, timesteps, context = unet_inputs(model, 2, size)
    with FlopCounterMode(display=False) as unet_counter:
        model.unet(sample, timesteps, context)
    with FlopCounterMode(display=False) as vae_counter:
        model.vae.decode(sample[:1].to(model.vae_dtype))
    return {
        "unet_cfg_step_flop": float(unet_counter.get_total_flops()),
        "vae_decode_flop": float(vae_counter.get_total_flops()),
    }


# --- where a UNet call spends its time --------------------------------------------------------------

KERNEL_KINDS = ("convolution", "GEMM", "attention", "elementwise/normalization", "other")

# (kind, pattern) in the order tried, case-insensitive, on CUDA kernel names and on the CPU's op names.
# A name often matches more than one kind: cuDNN's fused attention is an "fprop", its convolutions
# "implicit_gemm"s, and inductor names a generated kernel after every op it fuses
# (triton_poi_fused_convolution_silu_3 is a convolution's bias and SiLU, elementwise).
_KIND_PATTERNS = [
    ("other", r"^memcpy|^memset"),
    ("elementwise/normalization", r"^triton_(?:poi|red|per)_"),  # inductor's pointwise/reductions
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("convolution", r"conv(?!ert)|fprop|dgrad|wgrad|winograd|[shx]cudnn_"),
    (
        "GEMM",
        r"gemm|gemv|nvjet|cublas|cutlass|matmul|splitk|^triton_tem_|\b(?:addmm|baddbmm|bmm|mm|linear)\b",
    ),
    (
        "elementwise/normalization",
        r"elementwise|norm|moments|fusedparams|reduce|silu|gelu|sigmoid|tanh|copy|upsample|nchw|nhwc"
        r"|\b(?:add|sub|mul|div|neg|exp|pow|rsqrt|clamp|where|fill|clone|contiguous|cat|to|_to_copy"
        r"|index|gather|embedding|arange|cos|sin|chunk|split)_?\b",
    ),
]


def kernel_kind(name: str) -> str:
    """The kind (one of KERNEL_KINDS) of a CUDA kernel or a CPU op, from its name as torch.profiler
    gives it (e.g. sm90_xmma_fprop_implicit_gemm_... is a cuDNN convolution, nvjet_hsh_... a cuBLAS
    GEMM, triton_red_fused_native_group_norm_... an inductor reduction)."""
    return next(
        (kind for kind, pattern in _KIND_PATTERNS if re.search(pattern, name, re.IGNORECASE)), "other"
    )


def _profiled(call: Callable[[], Any], device: torch.device, calls: int) -> list[tuple[str, float, int]]:
    """(name, microseconds over all `calls`, count) of what `call` ran, largest first: kernels and
    their device time on a GPU (the ops that launch them are left out: they would count each kernel
    twice), ops and their host self time on the CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
        # renamed from *_cuda_* to *_device_* in recent PyTorch
        rows = [
            (
                e.key,
                getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0),
                e.count,
            )
            for e in kernels or events
        ]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    return sorted((row for row in rows if row[1] > 0), key=lambda row: row[1], reverse=True)


@torch.no_grad()
def profile_unet(
    model: StableDiffusion, rows: int, size: int, top: int = 25, calls: int = 3
) -> dict[str, Any]:
    """torch.profiler over `calls` UNet calls of `rows` rows (after 2 warm-up calls): the `top`
    kernels by device time on a GPU (ops by host self time on the CPU), with their share of the total."""
    inputs = unet_inputs(model, rows, size)
    for _ in range(2):
        model.unet(*inputs)
    events = _profiled(lambda: model.unet(*inputs), model.device, calls)
    total = sum(us for _, us, _ in events) or 1.0
    return {
        "rows": rows,
        "calls": calls,
        "time": "device" if model.device.type == "cuda" else "host",
        "ms_per_call": total / 1000 / calls,
        "top": [
            {
                "name": name,
                "ms_per_call": us / 1000 / calls,
                "share": us / total,
                "count_per_call": count / calls,
            }
            for name, us, count in events[:top]
        ],
    }


@torch.no_grad()
def kernel_profile(
    unet: Callable[..., torch.Tensor], model: StableDiffusion, rows: int, size: int, calls: int = 3
) -> dict[str, Any]:
    """torch.profiler over `calls` calls of `unet` (a runner, or the UNet) on `rows` rows, after 2
    warm-up calls: the time of its kernels (the CPU's ops) by kind (kernel_kind), each kind with its
    share, distinct kernels, launches per call and largest kernel; and the 10 largest kernels."""
    inputs = unet_inputs(model, rows, size)
    for _ in range(2):
        unet(*inputs)
    events = _profiled(lambda: unet(*inputs), model.device, calls)
    total = sum(us for _, us, _ in events) or 1.0
    kinds: dict[str, dict[str, Any]] = {
        kind: {
            "kind": kind,
            "ms_per_call": 0.0,
            "share": 0.0,
            "kernels": 0,
            "launches_per_call": 0.0,
            "largest": None,
        }
        for kind in KERNEL_KINDS
    }
    for name, us, count in events:  # largest first
        row = kinds[kernel_kind(name)]
        row["ms_per_call"] += us / 1000 / calls
        row["share"] += us / total
        row["kernels"] += 1
        row["launches_per_call"] += count / calls
        row["largest"] = row["largest"] or name
    return {
        "rows": rows,
        "calls": calls,
        "time": "device" if model.device.type == "cuda" else "host",
        "ms_per_call": total / 1000 / calls,
        "kinds": list(kinds.values()),
        "top": [
            {"name": name, "kind": kernel_kind(name), "ms_per_call": us / 1000 / calls, "share": us / total}
            for name, us, _ in events[:10]
        ],
    }


@torch.no_grad()
def time_unet_call(
    unet: Callable[..., torch.Tensor], model: StableDiffusion, rows: int, size: int, calls: int = 5
) -> float:
    """Milliseconds of one call of `unet` (a runner, or the UNet) on `rows` rows: the median of
    `calls` calls after 2 warm-up calls (which capture a runner's CUDA graph)."""
    inputs = unet_inputs(model, rows, size)
    for _ in range(2):
        unet(*inputs)
    times_ms = []
    for _ in range(calls):
        clock = Clock(model.device)
        clock.mark("start")
        unet(*inputs)
        clock.mark("end")
        times_ms.append(clock.seconds()["end"] * 1000)
    return statistics.median(times_ms)


# --- continuous batching: the engine in this process, and a real worker ------------------------------


class MemoryResults:
    """The engine's result sink without Redis: each picture encoded to a PNG as the worker does, the
    time each job's PNGs were done, and the encoding time summed over the writer threads."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.finished_at: dict[str, float] = {}
        self.png_s = 0.0
        self.lock = threading.Lock()

    def store(self, submission: Submission, pictures: Sequence[Picture]) -> JobResult:
        from models.image_files import encode_png
        from schemas.queue import ImageRef, JobResult

        started = time.perf_counter()
        for picture in pictures:
            encode_png(picture.pixels, submission.params.prompt)
        done = time.perf_counter()
        with self.lock:
            self.finished_at[submission.job_id] = done
            self.png_s += done - started
        refs = [
            ImageRef(index=i, seed=picture.seed, key=f"{submission.job_id}:{i}")
            for i, picture in enumerate(pictures)
        ]
        return JobResult(model=self.model_name, images=refs)


class NoProgress:
    """The engine's progress sink without Redis: publishes nothing, cancels nothing."""

    def sync(self, *args: Any, **kwargs: Any) -> set[str]:
        return set()


class DecodeTimedPipeline(Pipeline):
    """The Pipeline, keeping the host time span of each decode call (a call ends with the pixels on
    the host, so its span holds the device's work too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decode_spans: list[tuple[float, float]] = []

    def decode(self, images: Sequence[ActiveImage], max_batch: int = 8) -> list[Any]:
        started = time.perf_counter()
        try:
            return super().decode(images, max_batch)
        finally:
            self.decode_spans.append((started, time.perf_counter()))


def _engine_load(
    engine: Any, size: int, steps: int, count: int, seed0: int, timeout_s: float
) -> tuple[list[Submission], float]:
    """`count` one-image jobs (CFG, own prompts and seeds) submitted to `engine` at once, waited for;
    returns them and the time they were submitted (perf_counter)."""
    from workers.submission import Submission

    jobs = []
    for i in range(count):
        params = Generation(
            prompt=f"{PROMPTS[i % len(PROMPTS)]}, number {seed0 + i}",
            negative_prompt=NEGATIVE,
            width=size,
            height=size,
            steps=steps,
            guidance_scale=GUIDANCE,
            eta=0.0,
            seed=seed0 + i,
            num_images=1,
        )
        jobs.append(Submission(job_id=uuid.uuid4().hex, params=params))
    started = time.perf_counter()
    for job in jobs:
        engine.submit(job)
    for job in jobs:
        if not job.wait(timeout_s):
            raise TimeoutError(f"engine jobs not done within {timeout_s} s")
        job.outcome()  # raises the job's error, if any
    return jobs, started


def decode_tail(
    last_unet_end: float | None, decode_spans: list[tuple[float, float]], png_s: float, last_png: float
) -> dict[str, Any]:
    """The tail of a load after its last UNet call (perf_counter times): to the last PNG stored, the
    decode calls in it, from the last decode to the last PNG, the PNG encoding time (summed over the
    writer threads, which run in parallel)."""
    if last_unet_end is None:
        return {}
    decodes = [(start, end) for start, end in decode_spans if end > last_unet_end]
    return {
        "after_last_unet_s": last_png - last_unet_end,
        "decode_calls": len(decodes),
        "decode_s": sum(end - start for start, end in decodes),
        "last_decode_to_last_png_s": last_png - max(end for _, end in decodes) if decodes else None,
        "png_encode_s": png_s,
    }


def run_engine(
    model: StableDiffusion,
    runner: UNetRunner | None,
    requests: int,
    size: int,
    steps: int,
    max_rows: int,
    vae_batch: int,
    timeout_s: float = 600,
    warm_all_buckets: bool = True,
    vae_decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The real engine (admission, continuous batching, decode, PNG encoding on its writer threads)
    with in-memory stand-ins for Redis; `requests` one-image jobs submitted at once.

    Warm-up first: every bucket up to the load's rows, as the worker does at start
    (`warm_all_buckets`; off with torch.compile, whose compile of every bucket the bench need not
    pay), then the same load for 2 steps, which runs (so captures or compiles) the load's own calls,
    decode chunks and PNG sizes. Besides throughput and latency: the UNet calls timed on the device,
    the engine's step cadence, the PNG/decode tail after the last UNet call, and a control run of the
    same batch through the Pipeline directly."""
    from workers.engine import Engine, EngineConfig

    if runner is not None and warm_all_buckets:
        f = model.vae_scale_factor
        latent = (model.latent_channels, size // f, size // f)
        runner.warm_up(latent, (77, model.text_encoder.config.hidden_size), min(2 * requests, max_rows))
    timed = TimedUNet(runner if runner is not None else model.unet, model.device)
    # control: the same batch through the Pipeline directly, same runner, same minute (warm first)
    run_ours(model, timed, requests, size, min(2, steps), max_rows, vae_batch, vae_decoder)
    timed.start()
    control, _ = run_ours(model, timed, requests, size, steps, max_rows, vae_batch, vae_decoder)
    control_calls = timed.summary()
    results = MemoryResults(model.name)
    pipeline = DecodeTimedPipeline(model, unet_runner=timed, vae_decoder=vae_decoder)
    config = EngineConfig(max_batch_rows=max_rows, vae_batch=vae_batch)
    engine = Engine(model, config, results, NoProgress(), pipeline_factory=lambda _: pipeline)
    engine.start()
    try:
        row = _timed_engine_load(engine, results, pipeline, timed, size, steps, requests, timeout_s)
    finally:
        engine.drain(0)
        engine.join(60)
    row["control"] = {
        "what": "the same batch through the Pipeline directly, same runner, just before",
        "images_per_s": requests / control.total_s,
        **control.as_dict(),
        "unet_calls": control_calls,
    }
    return row


def _timed_engine_load(
    engine: Any,
    results: MemoryResults,
    pipeline: DecodeTimedPipeline,
    timed: TimedUNet,
    size: int,
    steps: int,
    requests: int,
    timeout_s: float,
) -> dict[str, Any]:
    """run_engine's load on a started engine: 2 warm-up loads of 2 steps, then the timed one, with
    the engine's per-step log lines, its UNet calls and its decode calls recorded."""
    steps_seen = StepTimes()
    engine_log = logging.getLogger("workers.engine")
    level = engine_log.level
    try:
        # warm-up: this load for 2 steps, twice. The first pays what is new to the engine's thread
        # (cuDNN autotuning is kept per thread: every VAE decode shape again, as the worker would
        # without its warm-up on the engine thread); the second shows the steady state.
        warm_loads_s = []
        for seed0 in (10_000, 20_000):
            warm_jobs, warm_started = _engine_load(engine, size, 2, requests, seed0, timeout_s)
            warm_loads_s.append(max(results.finished_at[job.job_id] for job in warm_jobs) - warm_started)
        before = engine.stats()
        engine_log.addHandler(steps_seen)
        engine_log.setLevel(logging.DEBUG)  # its per-step debug line: when each step's host work ended
        pipeline.decode_spans.clear()
        results.png_s = 0.0
        timed.start()
        jobs, started = _engine_load(engine, size, steps, requests, 0, timeout_s)
        after = engine.stats()
        last_unet_end = timed.last_end_on_host()
        engine_calls = timed.summary()
    finally:
        engine_log.removeHandler(steps_seen)
        engine_log.setLevel(level)
    ends = sorted(results.finished_at[job.job_id] - started for job in jobs)
    calls = max(1, after.unet_calls - before.unet_calls)
    return {
        "requests": requests,
        "images_per_s": requests / ends[-1],
        "p50_s": statistics.median(ends),
        "p99_s": ends[min(len(ends) - 1, round(0.99 * (len(ends) - 1)))],
        "rows_per_call": (after.unet_rows - before.unet_rows) / calls,
        "span_s": ends[-1],
        "phases": steps_seen.phases(started, ends[-1]),
        "tail": decode_tail(last_unet_end, pipeline.decode_spans, results.png_s, started + ends[-1]),
        "warm_up_loads_s": warm_loads_s,  # 2-step loads: first on a fresh engine thread, then again
        "unet_calls": engine_calls,
    }


class TimedUNet:
    """A UNet runner wrapped in CUDA events (perf_counter on the CPU): where each call starts and
    ends on the device, so an engine run splits into UNet time and the gaps between calls."""

    def __init__(self, inner: Callable[..., torch.Tensor], device: torch.device) -> None:
        self.inner = inner
        self.cuda = device.type == "cuda"
        self.calls: list[tuple[Any, Any, int]] | None = None  # (start, end, rows) while recording

    def start(self) -> None:
        self.calls = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __call__(self, sample: torch.Tensor, *args: Any) -> torch.Tensor:
        if self.calls is None:
            return self.inner(sample, *args)
        start = self._mark()
        output = self.inner(sample, *args)
        self.calls.append((start, self._mark(), sample.shape[0]))
        return output

    def last_end_on_host(self) -> float | None:
        """When the last recorded call ended on the device, as a perf_counter time. On a GPU an event
        recorded now ties the device's clock to the host's: call it with the device idle (a load's
        pictures all on the host), so that the event ends as soon as it is recorded."""
        if not self.calls:
            return None
        end = self.calls[-1][1]
        if not self.cuda:
            return end
        now = torch.cuda.Event(enable_timing=True)
        now.record()
        host_now = time.perf_counter()
        now.synchronize()
        return host_now - end.elapsed_time(now) / 1000

    def summary(self) -> dict[str, Any]:
        """Calls recorded since start(): device ms per call (median), cadence between call starts,
        and the UNet's share of the span from the first call's start to the last one's end."""
        calls, self.calls = self.calls or [], None
        if not calls:
            return {"calls": 0}
        if self.cuda:
            torch.cuda.synchronize()

            def ms(a: Any, b: Any) -> float:
                return a.elapsed_time(b)
        else:

            def ms(a: Any, b: Any) -> float:
                return (b - a) * 1000

        inside = [ms(start, end) for start, end, _ in calls]
        cadence = [ms(a[0], b[0]) for a, b in zip(calls, calls[1:], strict=False)]
        span = ms(calls[0][0], calls[-1][1])
        return {
            "calls": len(calls),
            "rows": sorted({rows for _, _, rows in calls}),
            "median_call_ms": statistics.median(inside),
            "max_call_ms": max(inside),
            "median_cadence_ms": statistics.median(cadence) if cadence else None,
            "max_gap_ms": max((c - i for c, i in zip(cadence, inside, strict=False)), default=None),
            "span_ms": span,
            "unet_share": sum(inside) / span if span > 0 else None,
        }


class StepTimes(logging.Handler):
    """Collects the engine's per-step debug lines: when each step's host work ended and how long it
    took. On a GPU the host runs ahead of the device until something waits for it, so the cadence
    of these lines shows where the host waits (a sync per step makes it the device's step time)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.ends: list[float] = []
        self.host_s: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("step:"):
            self.ends.append(time.perf_counter())
            self.host_s.append(float(record.args[-1]))  # type: ignore[index]

    def phases(self, started: float, span_s: float) -> dict[str, float | None]:
        if not self.ends:
            return {"steps_logged": 0}
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        return {
            "steps_logged": len(self.ends),
            "first_step_end_s": self.ends[0] - started,
            "last_step_end_s": self.ends[-1] - started,
            "after_last_step_s": span_s - (self.ends[-1] - started),
            "median_step_gap_ms": statistics.median(gaps) * 1000 if gaps else None,
            "median_step_host_ms": statistics.median(self.host_s) * 1000,
        }


def write_model_folder(model: StableDiffusion, config: str, out_dir: Path) -> Path:
    """`model`'s weights as a float16 diffusers folder (what a worker loads with SD_MODEL)."""
    from models.random_model import write_diffusers_folder

    weights = {}
    for name, module in (("unet", model.unet), ("vae", model.vae), ("text_encoder", model.text_encoder)):
        weights[name] = {
            k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()
        }
    weights["text_encoder"] = {
        (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in weights["text_encoder"].items()
    }
    return write_diffusers_folder(out_dir, component_configs(config), weights, TOKENIZER_PAD_TOKEN["sd1"])


def run_worker(
    model: StableDiffusion,
    config: str,
    device: str,
    requests: int,
    size: int,
    steps: int,
    max_rows: int,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """A real worker process (`python -m workers.main`, its default fast path changed by `env`) on a
    private redis-server, fed `requests` jobs at once exactly as the API enqueues them
    (bench/worker_bench.py)."""
    import argparse
    import shutil

    import worker_bench  # bench/ is on sys.path (bench/gpu.py); needs redis, rq, redis-server

    from tests.support.redis_server import RedisServer

    folder = Path(tempfile.mkdtemp(prefix="gpu-bench-model-"))
    server = RedisServer()
    try:
        model_dir = write_model_folder(model, config, folder / "model")
        server.start()
        args = argparse.Namespace(
            device=device,
            dtype=None,
            size=size,
            steps=steps,
            guidance=GUIDANCE,
            requests=requests,
            slots=None,
            vae_batch=None,
            torch_threads=None,
            timeout_s=600,
            worker_env=env,
            worker_log=log_path,
            start_timeout_s=400,  # torch.compile at warm-up, when env asks for it
        )
        row = worker_bench.run_mode("batched", max_rows, args, model_dir, server.url)
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
    return {"requests": requests, "env": env or {}, **row}
