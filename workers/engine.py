"""The engine: one thread that owns the model and runs every job of the process in one continuous batch.

Each iteration of its loop:
  1. admit   waiting jobs, oldest first, while their rows fit SD_MAX_BATCH_ROWS (batched prompt
             encoding for all of them at once);
  2. step    every running image once: one UNet call per latent shape (split into several calls
             when a group has more rows than the per-call limit);
  3. sync    one pipelined Redis round trip: progress of every job out, cancel flags in; then
             cancels, timeouts and the drain deadline take effect;
  4. retire  finished jobs: VAE decode in chunks, each chunk's PNGs + Redis at once on a small
             writer pool, so the next chunk and the next step do not wait for zlib or the network.

Faults stay with the job that caused them: an invalid request, a prompt that fails to encode or a
step that raises for one request fails that job alone; an out-of-memory error halves the rows per
UNet call and retries the same step (a failed step changes no image, see Pipeline.step).
Redis is reached only through the two sinks, so this module is testable without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from redis.exceptions import RedisError

from models.pipeline import ActiveImage, Picture, Pipeline, check_generation
from models.stable_diffusion import StableDiffusion
from schemas.errors import ErrorType
from schemas.queue import JobResult
from schemas.worker_info import EngineStats
from workers.batching import admit_count, group_by_shape, split_rows, total_rows
from workers.errors import (
    EngineFailure,
    JobCanceled,
    JobEnded,
    JobTimedOut,
    RequestFailed,
    WorkerShuttingDown,
)
from workers.faults import check_unet_call
from workers.previews import PreviewMaker
from workers.submission import Submission

log = logging.getLogger(__name__)


class ProgressSink(Protocol):
    def sync(self, progress: Mapping[str, tuple[int, int]]) -> set[str]:
        """Publish {job_id: (step, total_steps)}; return the ids among them whose cancel was asked.

        When some job asked for live previews, it is called as sync(progress, previews={job_id: PNG}).
        """
        ...


class ResultSink(Protocol):
    def store(self, submission: Submission, pictures: Sequence[Picture]) -> JobResult:
        """Store a finished job's pictures (in image order); return its small result document."""
        ...


@dataclass(frozen=True)
class EngineConfig:
    max_batch_rows: int  # UNet rows admitted into the batch (CFG: 2 per image)
    vae_batch: int  # latents per VAE decode call
    idle_wait_s: float = 0.5  # longest sleep with nothing to do (a submission wakes it at once)
    writer_threads: int = 4  # PNG encoding (zlib releases the GIL) + Redis SET, off the engine thread
    test_oom_above_rows: int | None = None  # TEST ONLY, see workers/faults.py
    # after this many UNet calls without an out-of-memory error, the rows per call double again (up
    # to max_batch_rows): one huge request must not slow the worker down until it restarts
    oom_recover_calls: int = 200


class Engine:
    def __init__(
        self,
        model: StableDiffusion,
        config: EngineConfig,
        results: ResultSink,
        progress: ProgressSink,
        pipeline_factory: Callable[[StableDiffusion], Pipeline] = Pipeline,
    ) -> None:
        self.model = model
        self.config = config
        self.pipeline = pipeline_factory(model)
        self.call_rows_limit = config.max_batch_rows  # halved by out-of-memory errors, regrown later
        self._calls_since_oom = 0
        self.vae_batch = config.vae_batch  # halved by out-of-memory errors while decoding
        self._results = results
        self._progress = progress
        self._previews = PreviewMaker()
        self._cond = threading.Condition()
        self._waiting: deque[Submission] = deque()  # guarded by _cond
        self._running: list[Submission] = []  # engine thread only, in admission order
        self._drain_deadline: float | None = None  # monotonic s; set once draining
        self._writer = ThreadPoolExecutor(config.writer_threads, thread_name_prefix="sd-writer")
        self._thread: threading.Thread | None = None
        self._stats = EngineStats(call_rows_limit=config.max_batch_rows)
        self._stats_lock = threading.Lock()
        self._redis_down_since: float | None = None
        self.failure: BaseException | None = None  # set if the loop itself crashed

    # --- called from other threads ------------------------------------------------------------------

    def start(self, warm_up: Callable[[], None] | None = None) -> None:
        """Start the engine thread; with `warm_up`, run it on that thread first and return once it is
        done. If it raises, the engine stops, jobs already submitted go back to the queue
        (WorkerShuttingDown) and start() raises RuntimeError from it. On that thread, because PyTorch keeps
        cuDNN's autotuning results per thread: a warm-up on another thread would leave the engine's
        first decode of each batch size to autotune again (seconds on a GPU, mid-batch)."""
        ready = threading.Event()
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                if warm_up is not None:
                    warm_up()
            except BaseException as error:
                outcome.append(error)
                self.failure = error
                return
            finally:
                ready.set()
            self._run()

        self._thread = threading.Thread(target=run, name="sd-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if outcome:
            self._writer.shutdown(wait=False)
            with self._cond:
                waiting = list(self._waiting)
                self._waiting.clear()
            for submission in waiting:  # never started: back to the queue, no retry used up
                self._end(
                    submission, WorkerShuttingDown("the worker's warm-up failed before the job started")
                )
            raise RuntimeError(f"the engine's warm-up failed: {outcome[0]!r}") from outcome[0]

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def submit(self, submission: Submission) -> None:
        """Queue a job for admission (also before start()); WorkerShuttingDown if this engine takes no
        more work."""
        with self._cond:
            stopped = self._thread is not None and not self._thread.is_alive()
            if self.draining or self.failure is not None or stopped:
                raise WorkerShuttingDown("this worker is shutting down; the job goes back to the queue")
            self._waiting.append(submission)
            self._cond.notify()

    def drain(self, timeout_s: float) -> None:
        """Take no new jobs; running ones have `timeout_s` to finish, then go back to the queue.

        Calling it again can only bring the deadline closer (a second SIGTERM: drain(0)).
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
            self._cond.notify()

    def join(self, timeout_s: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.alive

    def has_room(self) -> bool:
        """False while jobs handed over still wait to join the batch: no point taking more now."""
        with self._cond:
            return not self._waiting

    def stats(self) -> EngineStats:
        with self._stats_lock:
            stats = self._stats.model_copy()
        stats.call_rows_limit = self.call_rows_limit
        with self._cond:
            stats.jobs_in_engine = len(self._waiting) + len(self._running)
        return stats

    # --- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as error:  # a bug in the loop itself: fail loudly, lose no job
            self.failure = error
            log.critical("the engine crashed; its running jobs fail (RQ may retry them)", exc_info=True)
            with self._cond:
                running, waiting = list(self._running), list(self._waiting)
                self._running.clear()
                self._waiting.clear()
            for submission in running:
                self._end(submission, EngineFailure(f"the worker's engine crashed: {error!r}"))
            for submission in waiting:  # never started here: back to the queue, no retry used up
                self._end(
                    submission, WorkerShuttingDown("the worker's engine crashed before starting the job")
                )
        finally:
            self._writer.shutdown(wait=True)  # jobs already denoised still get their PNGs stored
            log.info("engine stopped")

    def _iterate(self) -> bool:
        """One iteration of the loop; False when the engine is drained and done."""
        self._admit()
        if not self._running:
            with self._cond:
                if self._waiting:
                    return True  # the last admission failed at start: admit the next ones
                if self.draining:
                    return False
                self._cond.wait(self.config.idle_wait_s)
            return True
        started = time.perf_counter()
        calls_before = self._stats.unet_calls
        self._step()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step: %d UNet call(s), %d rows, %d requests, %.3f s",
                self._stats.unet_calls - calls_before,
                total_rows(image for s in self._running for image in s.images),
                len(self._running),
                time.perf_counter() - started,
            )
        self._sync()
        self._retire()
        return True

    # --- 1. admission -----------------------------------------------------------------------------

    def _admit(self) -> None:
        with self._cond:
            running_rows = sum(s.rows for s in self._running)
            count = admit_count((s.rows for s in self._waiting), running_rows, self.config.max_batch_rows)
            batch = [self._waiting.popleft() for _ in range(count)]
        if batch:
            self._start(batch)

    def _start(self, batch: list[Submission]) -> None:
        """Encode the prompts of `batch` in one call and draw their initial noise; a request that
        cannot start fails alone (on a batched failure, each is retried alone to find it)."""
        valid = []
        for submission in batch:
            try:
                check_generation(self.model, submission.params)
            except ValueError as error:
                self._end(
                    submission,
                    RequestFailed(f"invalid request for this model: {error}", ErrorType.INVALID_REQUEST),
                )
                continue
            valid.append(submission)
        if not valid:
            return
        try:
            started = self.pipeline.start([(s, s.params) for s in valid])
        except Exception as error:
            if isinstance(error, torch.OutOfMemoryError):
                self._free_memory()
            if len(valid) > 1:
                log.warning(
                    "starting %d requests together failed (%r): starting each alone", len(valid), error
                )
                for submission in valid:
                    self._start([submission])
                return
            log.error("job %s: could not start", valid[0].job_id, exc_info=True)
            self._end(
                valid[0],
                RequestFailed(f"could not encode the prompt: {error}", ErrorType.PROMPT_ENCODING_FAILED),
            )
            return
        now = time.time()
        for submission, images in zip(valid, started, strict=True):
            submission.images = images
            submission.admitted_at = now
            self._running.append(submission)

    # --- 2. one denoising step for every running image -----------------------------------------------

    def _step(self) -> None:
        images = [image for s in self._running for image in s.images]
        for group in group_by_shape(images):
            self._step_group(group)

    def _step_group(self, images: Sequence[ActiveImage]) -> None:
        """Advance same-shape images by one step, in calls of at most `call_rows_limit` rows. The limit
        is read before each call, so an out-of-memory split also shrinks the calls still to come."""
        pending = list(images)
        while pending:
            chunk = split_rows(pending, self.call_rows_limit)[0]
            pending = pending[len(chunk) :]
            self._call(chunk)

    def _call(self, chunk: Sequence[ActiveImage]) -> None:
        live = [image for image in chunk if not _owner(image).finished]
        if not live:
            return
        rows = total_rows(live)
        owners = list(dict.fromkeys(_owner(image) for image in live))
        try:
            check_unet_call(rows, self.config.test_oom_above_rows)
            self.pipeline.step(live)
        except torch.OutOfMemoryError as error:
            self._free_memory()
            if len(live) == 1:
                request = owners[0].params
                self._end(
                    owners[0],
                    RequestFailed(
                        f"out of memory denoising one {request.width}x{request.height} image alone: {error}",
                        ErrorType.OUT_OF_MEMORY,
                    ),
                )
                return
            limit = max(1, min(self.call_rows_limit, rows // 2))
            log.warning(
                "out of memory in a UNet call of %d rows: rows per call %d -> %d, retrying the step split",
                rows,
                self.call_rows_limit,
                limit,
            )
            self.call_rows_limit = limit
            self._calls_since_oom = 0
            with self._stats_lock:
                self._stats.oom_splits += 1
            self._step_group(live)
            return
        except Exception as error:
            if len(owners) > 1:  # find the request at fault: retry each alone (the step changed nothing)
                log.warning("a UNet call of %d requests failed (%r): stepping each alone", len(owners), error)
                for owner in owners:
                    self._step_group([image for image in live if _owner(image) is owner])
                return
            log.error("job %s: denoising step failed", owners[0].job_id, exc_info=True)
            self._end(
                owners[0],
                RequestFailed(
                    f"denoising failed at step {owners[0].step}: {error}", ErrorType.GENERATION_FAILED
                ),
            )
            return
        self._regrow_after_oom()
        with self._stats_lock:
            stats = self._stats
            stats.unet_calls += 1
            stats.unet_rows += rows
            stats.unet_requests += len(owners)
            stats.max_requests_per_call = max(stats.max_requests_per_call, len(owners))
            stats.last_batch_rows = rows

    def _regrow_after_oom(self) -> None:
        if self.call_rows_limit >= self.config.max_batch_rows:
            return
        self._calls_since_oom += 1
        if self._calls_since_oom >= self.config.oom_recover_calls:
            limit = min(self.config.max_batch_rows, self.call_rows_limit * 2)
            log.info(
                "%d UNet calls without running out of memory: rows per call %d -> %d",
                self._calls_since_oom,
                self.call_rows_limit,
                limit,
            )
            self.call_rows_limit = limit
            self._calls_since_oom = 0

    # --- 3. progress out, cancel flags in, time limits ---------------------------------------------------

    def _sync(self) -> None:
        with self._cond:
            jobs = [*self._running, *self._waiting]
        canceled = self._publish(
            {s.job_id: (s.step, s.total_steps) for s in jobs}, self._previews.collect(self._running)
        )
        now = time.monotonic()
        for submission in jobs:
            if submission.job_id in canceled:
                self._end(
                    submission, JobCanceled(f"canceled at step {submission.step} of {submission.total_steps}")
                )
            elif submission.timed_out(now):
                self._end(
                    submission,
                    JobTimedOut(
                        f"timed out after {submission.timeout_s:g} s (the job's time limit), "
                        f"at step {submission.step} of {submission.total_steps}"
                    ),
                )
        if self._drain_deadline is not None and now >= self._drain_deadline:
            for submission in jobs:
                self._end(
                    submission,
                    WorkerShuttingDown(
                        f"the worker shut down at step {submission.step} of {submission.total_steps}; "
                        "the job goes back to the queue"
                    ),
                )
        with self._cond:
            if any(s.finished for s in self._waiting):
                self._waiting = deque(s for s in self._waiting if not s.finished)

    def _publish(self, progress: Mapping[str, tuple[int, int]], previews: Mapping[str, bytes]) -> set[str]:
        """One Redis round trip; while Redis is away the batch goes on (logged once per outage)."""
        try:
            # previews only when some job asked for one: a sink that knows none keeps working
            canceled = (
                self._progress.sync(progress, previews=previews)
                if previews
                else self._progress.sync(progress)
            )
        except RedisError as error:
            if self._redis_down_since is None:
                self._redis_down_since = time.monotonic()
                log.warning("Redis unreachable (%s): no progress or cancel until it is back", error)
            return set()
        if self._redis_down_since is not None:
            log.info("Redis reachable again after %.1f s", time.monotonic() - self._redis_down_since)
            self._redis_down_since = None
        return canceled

    # --- 4. retire: decode, then PNG + Redis on the writer pool -----------------------------------

    def _retire(self) -> None:
        denoised = [s for s in self._running if not s.finished and s.denoised]
        self._running = [s for s in self._running if not s.finished and not s.denoised]
        if denoised:
            self._decode_and_store(denoised)

    def _decode_and_store(self, submissions: list[Submission]) -> None:
        """Decode finished jobs about one VAE call (`vae_batch` latents) at a time, handing each
        call's jobs to the PNG writers at once: their encoding overlaps the next call's decode, and
        the first jobs are done one decode sooner."""
        batch: list[Submission] = []
        latents = 0
        for submission in submissions:
            count = len(submission.images)
            if batch and latents + count > self.vae_batch:
                self._decode_batch(batch)
                batch, latents = [], 0
            batch.append(submission)
            latents += count
        if batch:
            self._decode_batch(batch)

    def _decode_batch(self, submissions: list[Submission]) -> None:
        # each job's images, taken once: a slot may end a job (and drop its images) meanwhile
        groups = [(s, list(s.images)) for s in submissions]
        try:
            pictures = self._decode([image for _, images in groups for image in images])
        except Exception as error:
            if len(submissions) > 1:
                log.warning(
                    "decoding %d jobs together failed (%r): decoding each alone", len(submissions), error
                )
                for submission in submissions:
                    self._decode_batch([submission])
                return
            log.error("job %s: decoding failed", submissions[0].job_id, exc_info=True)
            self._end(
                submissions[0],
                RequestFailed(f"decoding the images failed: {error}", ErrorType.DECODING_FAILED),
            )
            return
        offset = 0
        for submission, images in groups:
            pixels = pictures[offset : offset + len(images)]
            self._writer.submit(
                self._write,
                submission,
                [Picture(p, image.seed) for p, image in zip(pixels, images, strict=True)],
            )
            offset += len(images)

    def _decode(self, images: Sequence[ActiveImage]) -> list[np.ndarray]:
        while True:
            try:
                return self.pipeline.decode(images, self.vae_batch)
            except torch.OutOfMemoryError:
                self._free_memory()
                if self.vae_batch == 1:
                    raise
                log.warning(
                    "out of memory decoding: latents per VAE call %d -> %d",
                    self.vae_batch,
                    self.vae_batch // 2,
                )
                self.vae_batch //= 2

    def _write(self, submission: Submission, pictures: Sequence[Picture]) -> None:
        """Writer pool: encode and store the PNGs, then wake the job's slot."""
        if submission.finished:  # its slot gave up on it meanwhile
            return
        try:
            result = self._results.store(submission, pictures)
        except Exception as error:
            log.error("job %s: storing the images failed", submission.job_id, exc_info=True)
            self._end(submission, EngineFailure(f"could not store the images in Redis: {error}"))
            return
        if submission.complete(result):
            with self._stats_lock:
                self._stats.jobs_succeeded += 1
                self._stats.images_generated += len(pictures)

    # --- helpers ------------------------------------------------------------------------------------

    def _end(self, submission: Submission, error: JobEnded) -> None:
        if not submission.fail(error):
            return
        with self._stats_lock:
            if isinstance(error, JobCanceled):
                self._stats.jobs_canceled += 1
            elif isinstance(error, WorkerShuttingDown):
                self._stats.jobs_requeued += 1
            else:
                self._stats.jobs_failed += 1

    def _free_memory(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()


def _owner(image: ActiveImage) -> Submission:
    owner = image.key
    assert isinstance(owner, Submission)
    return owner
