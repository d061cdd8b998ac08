"""The measurements of bench/gpu.py: build the models, time one batch through our engine path or
diffusers' pipeline, count FLOPs, run the engine or a real worker on a stream of requests.

Timing: CUDA events on a GPU (`Clock`), perf_counter on the CPU; every figure is the median of
repeats after a warm-up (which also captures the CUDA graphs and runs cuDNN's autotuning).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.accel import UNetRunner
from models.configs import UNetConfig, VAEConfig
from models.ddim import DDIMSchedule
from models.loading import SINGLE_FILE_CONFIGS, TOKENIZER_ASSETS, load_tokenizer, read_component_configs
from models.pipeline import GenerationRequest, Pipeline
from models.stable_diffusion import StableDiffusion
from models.tiny_configs import TOKENIZER_PAD_TOKEN, tiny_config
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL
from workers.batching import split_rows

GUIDANCE = 7.5
NEGATIVE = "blurry, low quality"
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a lighthouse at dusk, oil painting",
    "a red circle in the top left on a blue background",
    "a bowl of ramen, studio lighting, 35mm",
]
# Published cost of SD 1.5 at 512x512 (the figures): one CFG step (2 UNet rows), one decode
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
        DDIMSchedule.from_config(configs["scheduler"]),
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


def batch_requests(batch: int, size: int, steps: int) -> list[tuple[int, GenerationRequest]]:
    """`batch` one-image requests, as `batch` users would send them (CFG, own seeds and prompts)."""
    return [
        (
            i,
            GenerationRequest(
                prompt=f"{PROMPTS[i % len(PROMPTS)]}, number {i}",
                negative_prompt=NEGATIVE,
                width=size,
                height=size,
                steps=steps,
                guidance_scale=GUIDANCE,
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
) -> tuple[Timing, torch.Tensor]:
    """One batch through the Pipeline as the engine drives it (one call per <= max_rows rows per step,
    decode in chunks); returns the timing and the final latents (batch, C, h, w)."""
    sampler = Pipeline(model, unet_runner=runner, vae_decoder=vae_decoder)
    clock = Clock(model.device)
    clock.mark("start")
    images = [image for group in sampler.start(batch_requests(batch, size, steps)) for image in group]
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


@torch.no_grad()
def count_flops(model: StableDiffusion, size: int) -> dict[str, float]:
    """FLOPs of one CFG step (2 UNet rows) and one VAE decode at `size`, counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    f = model.vae_scale_factor
    device = model.device
    sample = torch.randn((2, model.latent_channels, size // f, size // f), device=device, dtype=model.dtype)
    context = torch.randn((2, 77, model.text_encoder.config.hidden_size), device=device, dtype=model.dtype)
    timesteps = torch.tensor([500, 500], device=device)
    with FlopCounterMode(display=False) as unet_counter:
        model.unet(sample, timesteps, context)
    with FlopCounterMode(display=False) as vae_counter:
        model.vae.decode(sample[:1].to(model.vae_dtype))
    return {
        "unet_cfg_step_flop": float(unet_counter.get_total_flops()),
        "vae_decode_flop": float(vae_counter.get_total_flops()),
    }


@torch.no_grad()
def profile_unet(
    model: StableDiffusion, rows: int, size: int, top: int = 25, calls: int = 3
) -> dict[str, Any]:
    """torch.profiler over `calls` UNet calls of `rows` rows (after 2 warm-up calls): the `top` ops
    by self time (device time on a GPU, host time on the CPU), with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    f = model.vae_scale_factor
    device, dtype = model.device, model.dtype
    sample = torch.randn((rows, model.latent_channels, size // f, size // f), device=device, dtype=dtype)
    context = torch.randn((rows, 77, model.text_encoder.config.hidden_size), device=device, dtype=dtype)
    timesteps = torch.full((rows,), 500, device=device)
    for _ in range(2):
        model.unet(sample, timesteps, context)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            model.unet(sample, timesteps, context)
        if cuda:
            torch.cuda.synchronize()

    def self_us(event: Any) -> float:
        if not cuda:
            return event.self_cpu_time_total
        # renamed from *_cuda_* to *_device_* in recent PyTorch
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return {
        "rows": rows,
        "calls": calls,
        "time": "device" if cuda else "host",
        "ms_per_call": total / 1000 / calls,
        "top": [
            {
                "name": e.key,
                "ms_per_call": self_us(e) / 1000 / calls,
                "share": self_us(e) / total,
                "count_per_call": e.count / calls,
            }
            for e in events[:top]
        ],
    }


# --- continuous batching: the engine in this process, and a real worker ------------------------------


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
    (`warm_all_buckets`; off with torch.compile, whose compile of every bucket the bench need not pay), then the same load for 2 steps,
    which runs (so captures or compiles) the load's own calls, decode chunks and PNG sizes."""
    from models.png import encode_png
    from schemas.queue import GenerationParams, ImageRef, JobResult
    from workers.engine import Engine, EngineConfig
    from workers.submission import Submission

    class MemoryResults:
        def __init__(self) -> None:
            self.finished_at: dict[str, float] = {}
            self.lock = threading.Lock()

        def store(self, submission: Submission, pictures: Any) -> JobResult:
            for picture in pictures:
                encode_png(picture, submission.params.prompt)
            with self.lock:
                self.finished_at[submission.job_id] = time.perf_counter()
            seeds = submission.params.image_seeds()
            return JobResult(
                model=model.name,
                images=[
                    ImageRef(index=i, seed=s, key=f"{submission.job_id}:{i}") for i, s in enumerate(seeds)
                ],
            )

    class NoProgress:
        def sync(self, progress: Any) -> set[str]:
            return set()

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
    results = MemoryResults()
    engine = Engine(
        model,
        EngineConfig(max_batch_rows=max_rows, vae_batch=vae_batch),
        results,
        NoProgress(),
        pipeline_factory=lambda m: Pipeline(m, unet_runner=timed, vae_decoder=vae_decoder),
    )
    engine.start()

    def submit(count: int, seed0: int, steps: int = steps) -> tuple[list[Submission], float]:
        jobs = []
        for i in range(count):
            params = GenerationParams(
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

    steps_seen = StepTimes()
    engine_log = logging.getLogger("workers.engine")
    level = engine_log.level
    try:
        # warm-up: this load for 2 steps, twice. The first pays what is new to the engine's thread
        # (cuDNN autotuning is kept per thread: every VAE decode shape again, as the worker would
        # without its warm-up on the engine thread); the second shows the steady state.
        warm_loads_s = []
        for seed0 in (10_000, 20_000):
            warm_jobs, warm_started = submit(requests, seed0, steps=2)
            warm_loads_s.append(max(results.finished_at[job.job_id] for job in warm_jobs) - warm_started)
        before = engine.stats()
        engine_log.addHandler(steps_seen)
        engine_log.setLevel(logging.DEBUG)  # its per-step debug line: when each step's host work ended
        timed.start()
        jobs, started = submit(requests, 0)
        after = engine.stats()
        engine_calls = timed.summary()
    finally:
        engine_log.removeHandler(steps_seen)
        engine_log.setLevel(level)
        engine.drain(0)
        engine.join(60)
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
        "warm_up_loads_s": warm_loads_s,  # 2-step loads: first on a fresh engine thread, then again
        "unet_calls": engine_calls,
        "control": {
            "what": "the same batch through the Pipeline directly, same runner, just before",
            "images_per_s": requests / control.total_s,
            **control.as_dict(),
            "unet_calls": control_calls,
        },
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
