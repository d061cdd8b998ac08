"""The GPU worker process: `python -m workers.main` (or `sdserve-worker`).

Loads the model once, then runs one engine thread (owns the model, batches every job), SD_SLOTS
slot threads (RQ workers feeding it) and a heartbeat thread; the main thread only waits for signals.

SIGTERM or SIGINT drains: the slots stop taking jobs at once (queued jobs stay for other workers),
running jobs get SD_DRAIN_TIMEOUT_S to finish, and any still running then go back to the front of
the queue (not failed, no retry used up). A second signal hands them back at the next step. Exit
status: 0 after a drain, 1 if the engine crashed, 2 for bad configuration or an unloadable model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from models.accel import AccelConfig, UNetRunner, VAEDecoder, prepare, prepare_vae
from models.families import family_of
from models.hub import resolve_model_source
from models.loading import load_model
from models.lora.layers import example_rows
from models.lora.library import LoraLibrary
from models.pipeline import Pipeline, VAEDecode, generate
from models.preview import rgb_map
from models.samplers import SAMPLERS
from models.single_file import CheckpointError
from models.stable_diffusion import StableDiffusion
from schemas.generation import SIZE_MULTIPLE, Generation
from schemas.model_names import model_name_from
from schemas.queue import queue_name
from schemas.settings import configure_logging, redis_client
from schemas.worker_info import WorkerInfo
from workers import job_function
from workers.device import Runtime, dtype_name, resolve_runtime
from workers.engine import Engine, EngineConfig
from workers.healthcheck import heartbeat_file
from workers.heartbeat import Heartbeat
from workers.janitor import sweep
from workers.loras import Rescan, build_library
from workers.progress import RedisProgress
from workers.results import ResultWriter
from workers.settings import ConfigurationError, WorkerSettings, load_settings
from workers.slots import SlotPool, SlotWorker

log = logging.getLogger("workers.main")

SLOTS_EXIT_GRACE_S = 30.0  # after the engine stopped: time for the slots' last RQ bookkeeping
CONTEXT_TOKENS = 77  # one prompt chunk: the context length of every prompt up to 75 tokens


def worker_redis(settings: WorkerSettings) -> redis.Redis:
    """Short timeouts and one immediate retry: a pooled connection that died with a Redis restart is
    replaced by the next command, and a Redis that is down fails fast (the callers ride it out)."""
    return redis_client(settings, retry=Retry(NoBackoff(), 1), health_check_interval=30)


def prepare_unet(model: StableDiffusion, runner: UNetRunner | None, max_rows: int) -> None:
    """Capture the UNet's CUDA graphs of every batch bucket at the native size (with SD_COMPILE,
    compiled first: about a minute for SD 1.5 on an H100 with a dynamic batch, ~40 s a bucket
    without), on the main thread, before the engine starts: graphs replay from any thread."""
    if runner is None:
        return
    started = time.perf_counter()
    context = (CONTEXT_TOKENS, model.context_dim)
    buckets = runner.warm_up(native_latent(model), context, max_rows)
    if model.unet.lora_rows is not None:  # calls with LoRA rows (and with LoCon's) are their own variants
        for conv in (False, True):
            rows = functools.partial(example_rows, device=model.device, dtype=model.dtype, conv=conv)
            buckets += runner.warm_up(native_latent(model), context, max_rows, extra_row_inputs=rows)
    log.info("UNet ready in %.1f s (%d batch buckets prepared)", time.perf_counter() - started, buckets)


def prepare_vae_decoder(model: StableDiffusion, vae_decoder: VAEDecoder | None) -> None:
    """With SD_COMPILE_VAE, compile the VAE decoder at the native size on the main thread, as the
    UNet's: one decode of 1 latent and one of 2 (the graph for every larger count)."""
    if vae_decoder is None or vae_decoder.compiled is None:
        return
    started = time.perf_counter()
    latent = native_latent(model)
    with torch.no_grad():
        for count in (1, 2):
            vae_decoder(torch.zeros((count, *latent), device=model.device, dtype=model.vae_dtype))
    log.info("VAE decoder compiled in %.1f s", time.perf_counter() - started)


def warm_up(
    model: StableDiffusion, runner: UNetRunner | None, vae_batch: int, vae_decoder: VAEDecode | None = None
) -> None:
    """One tiny guided generation, so the first job does not pay for lazy initialisation, and on
    CUDA one decode of every VAE batch size up to `vae_batch` (cuDNN autotunes each new shape). Run
    on the engine's thread (Engine.start): PyTorch keeps cuDNN's autotuning results per thread."""
    started = time.perf_counter()
    width, height = model.native_size
    generate(
        model,
        Generation(prompt="warm-up", width=width, height=height, steps=1),
        unet_runner=runner,
        vae_decoder=vae_decoder,
    )
    try:
        rgb_map(model)  # the live previews' colours, fitted to the VAE once (a few small decodes)
    except Exception:  # the previews then use a fixed map: never a reason not to serve
        log.warning("could not fit the live previews' colours to the VAE", exc_info=True)
    decodes = 0
    if model.device.type == "cuda" and torch.backends.cudnn.benchmark:
        pipeline = Pipeline(model, vae_decoder=vae_decoder)
        latent = native_latent(model)
        for count in range(2, vae_batch + 1):  # 1 was decoded by the generation above
            try:
                pipeline.decode_latents(torch.zeros((count, *latent), device=model.device))
            except torch.OutOfMemoryError:
                # the engine halves its VAE batch when a decode runs out of memory: not a reason to
                # refuse to start, only to stop warming up larger decodes
                torch.cuda.empty_cache()
                log.warning(
                    "warm-up: decoding %d latents at once ran out of memory; larger decodes skipped", count
                )
                break
            decodes += 1
    log.info("warm-up done in %.2f s (%d more VAE batch sizes)", time.perf_counter() - started, decodes)


def fast_path(
    accel: AccelConfig | None, settings: WorkerSettings, model: StableDiffusion
) -> AccelConfig | None:
    """The fast path for this model: with SD_COMPILE (or SD_COMPILE_VAE) and SD_COMPILE_SIZES=native,
    only its native size with one-chunk prompts is compiled (at warm-up), so no other request waits
    for a compile."""
    compiles = accel is not None and (accel.compile_mode != "off" or accel.compile_vae)
    if accel is None or not compiles or settings.compile_sizes == "all":
        return accel
    return dataclasses.replace(
        accel, compile_latents=(native_latent(model),), compile_context_lengths=(CONTEXT_TOKENS,)
    )


def native_latent(model: StableDiffusion) -> tuple[int, int, int]:
    """(C, h, w) of the model's latents at its native size."""
    width, height = model.native_size
    f = model.vae_scale_factor
    return (model.latent_channels, height // f, width // f)


@dataclass(frozen=True)
class FastPath:
    """How the UNet and the VAE run: through models/accel.py's runner and decoder (CUDA graphs,
    torch.compile), or plainly (both None). `fallback`: why the fast path was given up, if it was."""

    runner: UNetRunner | None = None
    vae_decoder: VAEDecode | None = None
    fallback: str | None = None

    @property
    def plain(self) -> bool:
        return self.runner is None and self.vae_decoder is None

    def describe(self) -> str:
        if self.fallback is not None:
            return f"plain (fell back: {self.fallback})"
        return "plain" if self.plain else "fast (CUDA graphs / torch.compile, models/accel.py)"


def prepare_fast_path(
    model: StableDiffusion, accel: AccelConfig | None, settings: WorkerSettings, runtime: Runtime
) -> FastPath:
    """The fast path, prepared on the main thread (graphs captured, compiled), or, if that fails,
    the plain path with one warning: a worker whose compile fails (no C compiler for Triton, a
    driver or inductor bug) still serves, more slowly, instead of restarting in a loop."""
    if accel is None:
        return FastPath()
    try:
        runner = prepare(model, accel)
        vae_decoder = prepare_vae(model, accel)
        log.info("UNet fast path: %s", accel)
        if settings.warmup:
            prepare_unet(model, runner, runtime.max_batch_rows)
            prepare_vae_decoder(model, vae_decoder)
        return FastPath(runner, vae_decoder)
    except Exception as error:
        return fall_back(error, "preparing it")


def fall_back(error: BaseException, when: str) -> FastPath:
    reason = f"{type(error).__name__} while {when}: {error}"
    log.warning(
        "the fast path failed (%s); running the plain, uncompiled path instead (slower; SD_COMPILE=off "
        "skips the attempt)",
        reason,
        exc_info=error,
    )
    return FastPath(fallback=reason)


class WorkerProcess:
    def __init__(
        self,
        settings: WorkerSettings,
        runtime: Runtime,
        model: StableDiffusion,
        model_name: str,
        fast: FastPath | None = None,
        loras: LoraLibrary | None = None,
    ) -> None:
        self.settings = settings
        self.loras = loras  # SD_LORA_DIR's LoRAs (workers/loras.py); None: requests naming one fail
        self.runtime = runtime
        self.model = model
        self.model_name = model_name
        self.fast = fast or FastPath()
        self.name = settings.resolved_worker_name()
        self.client = worker_redis(settings)
        self.engine = self._make_engine()
        self.slots = SlotPool(
            runtime.slots,
            self.name,
            queue_name(model_name),  # this model's jobs only
            connect=lambda: worker_redis(settings),
            job_heartbeat_ttl_s=settings.job_heartbeat_ttl_s,
            result_ttl_s=settings.result_ttl_s,
            maintenance=self._maintenance,
            has_room=lambda: self.engine.has_room(),
            redis_outage_wait_s=settings.redis_outage_wait_s,
        )
        width, height = model.native_size
        stamp = time.time()
        info = WorkerInfo(
            name=self.name,
            model=model_name,
            native_width=width,
            native_height=height,
            family=family_of(model).name,
            size_multiple=math.lcm(SIZE_MULTIPLE, model.vae_scale_factor),
            default_steps=model.recommended.get("steps"),
            default_guidance_scale=model.recommended.get("guidance_scale"),
            default_sampler=model.recommended.get("sampler"),
            default_scheduler=model.recommended.get("scheduler"),
            samplers=list(SAMPLERS),
            device=str(runtime.device),
            dtype=dtype_name(runtime.dtype),
            max_batch_rows=runtime.max_batch_rows,
            slots=runtime.slots,
            started_at=stamp,
            heartbeat_at=stamp,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            fast_path=self.fast.describe(),
            loras=loras.listing() if loras is not None else [],
            max_loras_per_request=settings.max_loras_per_request if loras is not None else 0,
        )
        self.heartbeat = Heartbeat(
            self.client,
            info,
            lambda: self.engine.stats(),
            self.slots,
            settings.job_heartbeat_ttl_s,
            engine_alive=lambda: self.engine.alive,
            health_file=heartbeat_file(settings.device),
        )
        self._stop = threading.Event()
        self._signals = 0

    def _make_engine(self) -> Engine:
        settings, runtime, fast = self.settings, self.runtime, self.fast
        return Engine(
            self.model,
            EngineConfig(
                max_batch_rows=runtime.max_batch_rows,
                vae_batch=runtime.vae_batch,
                test_oom_above_rows=settings.test_oom_above_rows,
            ),
            results=ResultWriter(
                self.client,
                self.model_name,
                settings.result_ttl_s,
                wait_s=settings.redis_outage_wait_s,
                buffer_bytes=settings.result_buffer_mb * 2**20,
                lora_hashes=self.loras.short_hashes if self.loras is not None else None,
            ),
            progress=RedisProgress(self.client, settings.result_ttl_s, self.name),
            pipeline_factory=lambda m: Pipeline(
                m, runtime.text_batch, unet_runner=fast.runner, vae_decoder=fast.vae_decoder, loras=self.loras
            ),
        )

    def _warm_up(self) -> Callable[[], None] | None:
        """One tiny generation (and the VAE's batch sizes) on the engine's thread, through the path
        the engine uses; None with SD_WARMUP off."""
        if not self.settings.warmup:
            return None
        return functools.partial(
            warm_up, self.model, self.fast.runner, self.runtime.vae_batch, self.fast.vae_decoder
        )

    def _start_engine(self) -> bool:
        """Start the engine after its warm-up; if the fast path's warm-up fails, again on the plain
        path (one warning). False if even that fails."""
        try:
            self.engine.start(warm_up=self._warm_up())
            return True
        except RuntimeError as error:
            if self.fast.plain:
                log.critical("cannot start: the warm-up failed", exc_info=True)
                return False
            self.fast = fall_back(error.__cause__ or error, "warming up")
            self.heartbeat.info = self.heartbeat.info.model_copy(update={"fast_path": self.fast.describe()})
        self.engine = self._make_engine()
        try:
            self.engine.start(warm_up=self._warm_up())
            return True
        except RuntimeError:
            log.critical("cannot start: the warm-up failed on the plain path too", exc_info=True)
            return False

    def _maintenance(self, worker: SlotWorker) -> None:
        sweep(worker.connection, self.settings.job_heartbeat_ttl_s, self.settings.worker_stale_s, worker)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info(
                "%s: draining (running jobs get %g s)",
                signal.Signals(signum).name,
                self.settings.drain_timeout_s,
            )
            self._stop.set()
        else:
            log.warning("%s again: handing running jobs back to the queue now", signal.Signals(signum).name)
            self.engine.drain(0)

    def run(self) -> int:
        if not self._start_engine():
            return 1
        job_function.set_engine(self.engine)
        self.heartbeat.start()
        self.slots.start()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        runtime = self.runtime
        log.info(
            "worker %s ready: %d slots, %d rows per batch, VAE %d per call, %s %s",
            self.name,
            runtime.slots,
            runtime.max_batch_rows,
            runtime.vae_batch,
            runtime.device,
            dtype_name(runtime.dtype),
        )
        exit_code = 0
        rescan = Rescan(self.loras) if self.loras is not None else None
        while not self._stop.wait(0.5):
            listing = rescan.due() if rescan is not None else None
            if listing is not None:
                self.heartbeat.info = self.heartbeat.info.model_copy(update={"loras": listing})
            if not self.engine.alive:
                log.critical("the engine thread died (%r): shutting the worker down", self.engine.failure)
                exit_code = 1
                break
        self.slots.stop_dequeuing()
        self.engine.drain(self.settings.drain_timeout_s)
        if not self.engine.join(self.settings.drain_timeout_s + SLOTS_EXIT_GRACE_S):
            log.error("the engine did not stop within the drain timeout")
            exit_code = exit_code or 1
        if not self.slots.join(SLOTS_EXIT_GRACE_S):
            log.error("some slots did not finish their RQ bookkeeping in time")
        self.heartbeat.stop()
        job_function.set_engine(None)
        log.info("worker %s stopped", self.name)
        return exit_code


def main() -> int:
    try:
        settings = load_settings()
    except ConfigurationError as error:
        configure_logging("INFO")
        log.error("%s", error)
        return 2
    configure_logging(settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        runtime = resolve_runtime(settings)
        # a hub id is fetched into the Hugging Face cache (progress bars on stderr), once
        source = resolve_model_source(settings.model, prefer_fp16=runtime.dtype == torch.float16)
        model_path = source.path
        log.info(
            "loading %s on %s (%s, VAE %s%s)",
            model_path,
            runtime.device,
            dtype_name(runtime.dtype),
            dtype_name(runtime.vae_dtype),
            " with a float32 fallback" if runtime.vae_fallback else "",
        )
        model = load_model(
            model_path,
            runtime.device,
            runtime.dtype,
            vae_dtype=runtime.vae_dtype,
            vae_fallback=runtime.vae_fallback,
            config=settings.model_config_dir or None,
        )
    except (CheckpointError, RuntimeError, OSError) as error:
        log.error("cannot start: %s", error)
        return 2
    try:
        loras = build_library(settings, model)  # before the fast path: the pool replaces UNet layers
    except ConfigurationError as error:
        log.error("cannot start: %s", error)
        return 2
    width, height = model.native_size
    log.info("model %s: %s, native size %dx%d", model.name, family_of(model).label, width, height)
    fast = prepare_fast_path(model, fast_path(runtime.accel, settings, model), settings, runtime)
    name = settings.model_name or source.name or model_name_from(model.name)
    log.info("serving model %s on queue %s", name, queue_name(name))
    return WorkerProcess(settings, runtime, model, name, fast, loras=loras).run()


if __name__ == "__main__":
    sys.exit(main())
