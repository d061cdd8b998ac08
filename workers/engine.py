"""The engine: one thread that owns the model and runs every job of the process in one continuous batch.

Each iteration of its loop:
  1. accept  jobs the slots handed over (checked against the model: an invalid one fails alone);
  2. share   the step's rows among the jobs, oldest first, one image per job per round
             (workers/batching.py: share_rows), so a big job's images interleave with small jobs
             and a job's images may take different steps (each has its own state);
  3. start   jobs that get rows for the first time: their input images (img2img, inpainting)
             through the VAE encoder in batches, their prompts encoded in one batch, their first
             latents drawn (an img2img job starts later in its schedule, and shares the UNet calls);
  4. step    the chosen images once: one UNet call per latent shape (split into several calls when
             a group has more rows than the device takes);
  5. sync    one pipelined Redis round trip: progress of the jobs that have stepped, the list of
             those still waiting, cancel flags back; then cancels, timeouts and the drain deadline;
  6. retire  jobs whose images are all denoised: VAE decode in chunks, each chunk's PNGs + Redis on a
             small writer pool, so the next chunk and the next step do not wait for zlib or Redis.

Faults stay with the job that caused them (workers/recovery.py): a batch that fails is retried one
job at a time, and out-of-memory errors halve the batch limit and retry (a failed step changes no
image, see Pipeline.step). Redis is reached only through the two sinks, so this module is
testable without it. Which threads may end a job: see workers/submission.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from redis.exceptions import RedisError

from models.image_inputs import ImageInputs
from models.img2img import EncodedInputs, check_inputs
from models.lora.files import LoraFileError
from models.lora.pool import LoraSlotsBusy
from models.pipeline import ActiveImage, Picture, Pipeline, check_generation, classifier_free
from models.stable_diffusion import StableDiffusion
from schemas.errors import ErrorType
from schemas.generation import Generation
from schemas.queue import JobResult
from schemas.worker_info import EngineStats
from workers.batching import Demand, group_by_shape, share_rows, split_rows, total_rows
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
from workers.recovery import AdaptiveLimit, isolate_failures
from workers.redis_outage import OUTAGE
from workers.submission import Submission

log = logging.getLogger(__name__)


class Progress(NamedTuple):
    step: int
    total_steps: int
    attempt: str  # the RQ worker running the job (schemas/redis_keys.py: progress_key)


class ProgressSink(Protocol):
    def sync(
        self,
        running: Mapping[str, Progress],
        waiting: Sequence[tuple[str, float]],
        previews: Mapping[str, bytes],
    ) -> set[str]:
        """Publish the progress of the jobs that have stepped, the (job id, enqueued-at) of those
        still waiting for their first step, and live previews ({job id: PNG}); return the ids among
        all of them whose cancel was asked."""
        ...


class ResultSink(Protocol):
    def store(self, submission: Submission, pictures: Sequence[Picture]) -> JobResult:
        """Store a finished job's pictures (in image order); return its small result document."""
        ...


@dataclass(frozen=True)
class EngineConfig:
    max_batch_rows: int  # UNet rows per step (CFG: 2 per image)
    vae_batch: int  # latents per VAE decode call
    idle_wait_s: float = 0.5  # longest sleep with nothing to do (a submission wakes it at once)
    writer_threads: int = 4  # PNG encoding (zlib releases the GIL) + Redis SET, off the engine thread
    test_oom_above_rows: int | None = None  # TEST ONLY, see workers/faults.py
    # after this many clean UNet calls (VAE decodes) below the configured limit, it doubles again
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
        self.unet_rows = AdaptiveLimit("UNet call", "rows", config.max_batch_rows, config.oom_recover_calls)
        self.vae_batch = AdaptiveLimit("VAE call", "latents", config.vae_batch, config.oom_recover_calls)
        # input images per VAE encoder call (img2img, inpainting): as many as latents per decode
        self.vae_encode = AdaptiveLimit("VAE encode", "images", config.vae_batch, config.oom_recover_calls)
        self._results = results
        self._progress = progress
        self._previews = PreviewMaker(model)
        self._cond = threading.Condition()
        self._inbox: deque[Submission] = deque()  # guarded by _cond: handed over, not yet accepted
        self._jobs: list[Submission] = []  # engine thread only: accepted, oldest first
        self._waiting_jobs = 0  # guarded by _cond: accepted jobs the last share gave no rows
        self._listed_jobs = False  # the last progress round trip published some job
        self._drain_deadline: float | None = None  # monotonic s; set once draining
        self._writer = ThreadPoolExecutor(config.writer_threads, thread_name_prefix="sd-writer")
        self._thread: threading.Thread | None = None
        self._stats = EngineStats(call_rows_limit=config.max_batch_rows)
        self._stats_lock = threading.Lock()
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
                waiting = list(self._inbox)
                self._inbox.clear()
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
        """Queue a job for the batch (also before start()); WorkerShuttingDown if this engine takes no
        more work."""
        with self._cond:
            stopped = self._thread is not None and not self._thread.is_alive()
            if self.draining or self.failure is not None or stopped:
                raise WorkerShuttingDown("this worker is shutting down; the job goes back to the queue")
            self._inbox.append(submission)
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
        """False while jobs handed over still wait for their first rows: no point taking more now
        (they stay in the queue, where a worker with room can take them)."""
        with self._cond:
            return not self._inbox and not self._waiting_jobs

    def stats(self) -> EngineStats:
        with self._stats_lock:
            stats = self._stats.model_copy()
        stats.call_rows_limit = self.unet_rows.value
        with self._cond:
            stats.jobs_in_engine = len(self._inbox) + len(self._jobs)
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
                jobs, inbox = list(self._jobs), list(self._inbox)
                self._jobs.clear()
                self._inbox.clear()
            for submission in jobs:
                if submission.stepped:
                    self._end(submission, EngineFailure(f"the worker's engine crashed: {error!r}"))
                else:  # never started here: back to the queue, no retry used up
                    self._end(
                        submission, WorkerShuttingDown("the worker's engine crashed before the job started")
                    )
            for submission in inbox:
                self._end(
                    submission, WorkerShuttingDown("the worker's engine crashed before the job started")
                )
        finally:
            self._writer.shutdown(wait=True)  # jobs already denoised still get their PNGs stored
            log.info("engine stopped")

    def _iterate(self) -> bool:
        """One iteration of the loop; False when the engine is drained and done."""
        self._accept()
        if not self._jobs:
            with self._cond:
                if self._inbox:
                    return True
                if self.draining:
                    return False
                self._cond.wait(self.config.idle_wait_s)
            return True
        chosen = self._share()
        started = time.perf_counter()
        self._step(chosen)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step: %d images, %d rows, %d jobs, %.3f s",
                len(chosen),
                total_rows(chosen),
                len({id(_owner(image)) for image in chosen}),
                time.perf_counter() - started,
            )
        self._sync()
        self._retire()
        return True

    # --- 1. accept --------------------------------------------------------------------------------

    def _accept(self) -> None:
        with self._cond:
            arrived = list(self._inbox)
            self._inbox.clear()
        for submission in arrived:
            try:
                check_generation(self.model, submission.params)
                check_inputs(submission.params, submission.inputs)
            except ValueError as error:
                self._end(
                    submission,
                    RequestFailed(f"invalid request for this model: {error}", ErrorType.INVALID_REQUEST),
                )
                continue
            self._jobs.append(submission)

    # --- 2. share the step's rows -----------------------------------------------------------------------

    def _share(self) -> list[ActiveImage]:
        """The images that take this step: each job's share (share_rows), its most advanced images
        first, so a job's images stay together when they can."""
        jobs = [s for s in self._jobs if not s.finished]
        demands = [Demand(self._rows_per_image(s), s.images_left) for s in jobs]
        shares = share_rows(demands, self.config.max_batch_rows)
        with self._cond:
            self._waiting_jobs = sum(1 for s, k in zip(jobs, shares, strict=True) if k == 0 and not s.stepped)
        self._start([s for s, k in zip(jobs, shares, strict=True) if k > 0 and not s.started])
        chosen: list[ActiveImage] = []
        for submission, count in zip(jobs, shares, strict=True):
            left = [image for image in submission.images if not image.done]
            left.sort(key=lambda image: -image.step_index)  # stable: lower index first among equals
            chosen.extend(left[:count])
        return chosen

    # --- 3. start: prompts encoded, noise drawn ------------------------------------------------------

    def _start(self, batch: list[Submission]) -> None:
        """Encode the input images of `batch` (_encode_inputs), its prompts in one call, and draw their
        first latents; a request that cannot start fails alone."""
        self._encode_inputs(batch)
        batch = self._lora_slots_for([s for s in batch if not s.finished])
        if not batch:
            return

        def start(jobs: Sequence[Submission]) -> None:
            items = [(s, s.params) for s in jobs]
            encoded = [s.encoded for s in jobs]
            try:
                if any(e is not None for e in encoded):
                    started = self.pipeline.start(items, encoded)
                else:  # no input images: the plain call (test pipelines override start(items))
                    started = self.pipeline.start(items)
            except torch.OutOfMemoryError:
                self._free_memory()
                raise
            for submission, images in zip(jobs, started, strict=True):
                submission.attach_images(images)
                submission.inputs = submission.encoded = None  # its images hold what they need

        def fail(submission: Submission, error: Exception) -> None:
            if isinstance(error, LoraSlotsBusy):  # waits, unstarted, for a slot to free up
                return
            if isinstance(error, LoraFileError):
                self._end(submission, RequestFailed(str(error), ErrorType.INVALID_REQUEST))
                return
            log.error("job %s: could not start", submission.job_id, exc_info=error)
            self._end(
                submission,
                RequestFailed(f"could not encode the prompt: {error}", ErrorType.PROMPT_ENCODING_FAILED),
            )

        isolate_failures(batch, start, fail, "starting")

    def _lora_slots_for(self, batch: list[Submission]) -> list[Submission]:
        """The jobs whose LoRAs the device pool can take now (models/lora/pool.py); the others stay
        unstarted until running images release their slots."""
        loras = getattr(self.pipeline, "loras", None)
        wanting = [s for s in batch if s.params.loras]
        if loras is None or not wanting:
            return batch
        fits = dict(zip(map(id, wanting), loras.admit([s.params.loras for s in wanting]), strict=True))
        return [s for s in batch if fits.get(id(s), True)]

    def _encode_inputs(self, batch: Sequence[Submission]) -> None:
        """The jobs' input images through the VAE encoder, images of a size together in calls of at most
        `vae_encode` (halved when out of memory); each job keeps its encodings until it starts, and a
        job whose images cannot be encoded fails alone."""
        jobs = [s for s in batch if s.encoded is None and (s.inputs is not None or self.model.inpainting)]
        if not jobs:
            return

        def encode(group: Sequence[Submission]) -> None:
            encoded = self._encode([(s.params, s.inputs) for s in group])
            for submission, inputs in zip(group, encoded, strict=True):
                submission.encoded = inputs

        def fail(submission: Submission, error: Exception) -> None:
            log.error("job %s: could not encode its input images", submission.job_id, exc_info=error)
            self._end(
                submission,
                RequestFailed(f"encoding the input images failed: {error}", ErrorType.IMAGE_ENCODING_FAILED),
            )

        isolate_failures(jobs, encode, fail, "encoding the input images of")

    def _encode(self, requests: list[tuple[Generation, ImageInputs | None]]) -> list[EncodedInputs | None]:
        while True:
            try:
                encoded = self.pipeline.encode_inputs(requests, self.vae_encode.value)
            except torch.OutOfMemoryError:
                self._free_memory()
                # at most two images per request: the init image and the masked image
                if not self.vae_encode.shrink(min(2 * len(requests), self.vae_encode.value)):
                    raise
                continue
            self.vae_encode.succeeded()
            return encoded

    # --- 4. one denoising step for the chosen images ----------------------------------------------------

    def _step(self, images: Sequence[ActiveImage]) -> None:
        now = time.time()
        for group in group_by_shape(images):
            self._step_group(group)
        for image in images:
            owner = _owner(image)
            if owner.admitted_at is None and not owner.finished:
                owner.admitted_at = now

    def _step_group(self, images: Sequence[ActiveImage]) -> None:
        """Advance same-shape images by one step, in calls of at most `unet_rows` rows. The limit is
        read before each call, so an out-of-memory error also shrinks the calls still to come."""
        pending = list(images)
        while pending:
            chunk = split_rows(pending, self.unet_rows.value)[0]
            if self._call(chunk):
                pending = pending[len(chunk) :]

    def _call(self, chunk: Sequence[ActiveImage]) -> bool:
        """One UNet call; False when it ran out of memory and lowered the rows per call (the caller
        cuts the chunk again). Any other failure: the call's jobs are tried one at a time, and the
        one that fails alone ends (isolate_failures)."""
        live = [image for image in chunk if not _owner(image).finished]
        if not live:
            return True
        try:
            self._unet_step(live)
            return True
        except torch.OutOfMemoryError:
            self._free_memory()
            if len(live) > 1 and self.unet_rows.shrink(total_rows(live)):
                with self._stats_lock:
                    self._stats.oom_splits += 1
                return False
        except Exception:
            pass  # found below, job by job
        owners = list(dict.fromkeys(_owner(image) for image in live))
        isolate_failures(
            owners,
            lambda jobs: self._unet_step([i for i in live if _owner(i) in jobs]),
            self._step_failed,
            "stepping",
        )
        return True

    def _unet_step(self, images: Sequence[ActiveImage]) -> None:
        rows = total_rows(images)
        check_unet_call(rows, self.config.test_oom_above_rows)
        self.pipeline.step(images)
        self.unet_rows.succeeded()
        jobs = len({id(_owner(image)) for image in images})
        with self._stats_lock:
            stats = self._stats
            stats.unet_calls += 1
            stats.unet_rows += rows
            stats.unet_requests += jobs
            stats.max_requests_per_call = max(stats.max_requests_per_call, jobs)
            stats.last_batch_rows = rows

    def _step_failed(self, submission: Submission, error: Exception) -> None:
        params = submission.params
        if isinstance(error, torch.OutOfMemoryError):
            self._free_memory()
            message = f"out of memory denoising one {params.width}x{params.height} image alone: {error}"
            self._end(submission, RequestFailed(message, ErrorType.OUT_OF_MEMORY))
            return
        log.error("job %s: denoising step failed", submission.job_id, exc_info=error)
        message = f"denoising failed at step {submission.step}: {error}"
        self._end(submission, RequestFailed(message, ErrorType.GENERATION_FAILED))

    # --- 5. progress out, cancel flags in, time limits ---------------------------------------------------

    def _sync(self) -> None:
        with self._cond:
            jobs = [*self._jobs, *self._inbox]
        running = {s.job_id: Progress(s.step, s.total_steps, s.attempt) for s in jobs if s.stepped}
        waiting = [
            (s.job_id, s.enqueued_at if s.enqueued_at is not None else s.submitted_at)
            for s in jobs
            if not s.stepped and not s.finished
        ]
        canceled = self._publish(running, waiting, self._previews.collect(self._jobs))
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
            self._inbox = deque(s for s in self._inbox if not s.finished)

    def _publish(
        self,
        running: Mapping[str, Progress],
        waiting: Sequence[tuple[str, float]],
        previews: Mapping[str, bytes],
    ) -> set[str]:
        """One Redis round trip; while Redis is away the batch goes on (OUTAGE logs it once)."""
        if not running and not waiting and not self._listed_jobs:
            return set()  # nothing to say, and the last round trip already cleared the lists
        try:
            canceled = self._progress.sync(running, waiting, previews)
        except RedisError as error:
            OUTAGE.failed(error)
            return set()
        OUTAGE.answered()
        self._listed_jobs = bool(running or waiting)
        return canceled

    # --- 6. retire: decode, then PNG + Redis on the writer pool -----------------------------------

    def _retire(self) -> None:
        denoised = [s for s in self._jobs if not s.finished and s.denoised]
        self._jobs = [s for s in self._jobs if not s.finished and not s.denoised]
        if denoised:
            self._decode_and_store(denoised)

    def _decode_and_store(self, submissions: list[Submission]) -> None:
        """Decode finished jobs about one VAE call at a time, handing each call's jobs to the PNG
        writers at once: their encoding overlaps the next call's decode, and the first jobs are done
        one decode sooner."""
        batch: list[Submission] = []
        latents = 0
        for submission in submissions:
            count = len(submission.images)
            if batch and latents + count > self.vae_batch.value:
                self._decode_batch(batch)
                batch, latents = [], 0
            batch.append(submission)
            latents += count
        if batch:
            self._decode_batch(batch)

    def _decode_batch(self, submissions: list[Submission]) -> None:
        def decode(jobs: Sequence[Submission]) -> None:
            groups = [(s, s.image_snapshot()) for s in jobs]
            pictures = self._decode([image for _, images in groups for image in images])
            offset = 0
            for submission, images in groups:
                pixels = pictures[offset : offset + len(images)]
                offset += len(images)
                self._writer.submit(
                    self._write, submission, [Picture(p, i.seed) for p, i in zip(pixels, images, strict=True)]
                )

        def fail(submission: Submission, error: Exception) -> None:
            log.error("job %s: decoding failed", submission.job_id, exc_info=error)
            self._end(
                submission, RequestFailed(f"decoding the images failed: {error}", ErrorType.DECODING_FAILED)
            )

        isolate_failures(submissions, decode, fail, "decoding")

    def _decode(self, images: Sequence[ActiveImage]) -> list:
        while True:
            try:
                pictures = self.pipeline.decode(images, self.vae_batch.value)
            except torch.OutOfMemoryError:
                self._free_memory()
                if not self.vae_batch.shrink(min(len(images), self.vae_batch.value)):
                    raise
                continue
            self.vae_batch.succeeded()
            return pictures

    def _write(self, submission: Submission, pictures: Sequence[Picture]) -> None:
        """Writer pool: encode and store the PNGs, then wake the job's slot."""
        if submission.finished:  # its slot gave up on it meanwhile
            return
        try:
            result = self._results.store(submission, pictures)
        except JobEnded as ending:  # the sink gave up on storing (e.g. a long Redis outage)
            self._end(submission, ending)
            return
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

    def _rows_per_image(self, submission: Submission) -> int:
        """UNet rows per image and step: 2 with classifier-free guidance, else 1."""
        return 2 if submission.params.guided and classifier_free(self.model) else 1

    def _free_memory(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()


def _owner(image: ActiveImage) -> Submission:
    owner = image.key
    assert isinstance(owner, Submission)
    return owner
