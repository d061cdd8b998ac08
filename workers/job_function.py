"""The RQ job function, `workers.job_function.generate(params)`: hand the request to this process's engine and
wait for it, so RQ records status, result, failure and retries through its normal per-job path.

It runs in a slot thread (workers/slots.py). The engine is process-global: `set_engine` is called
once by workers/main.py after the model is loaded. An img2img or inpainting job's input images are
fetched from Redis (the job's own connection), decoded and fitted to its size here, off the engine's
thread, and handed to the engine as arrays: the engine never reads Redis for them.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis
from pydantic import ValidationError
from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job

from models.image_inputs import ImageInputs, InputImageError, load_inputs
from models.lora.files import LoraFileError
from schemas.errors import ErrorType
from schemas.generation import Generation
from schemas.queue import WARNINGS_META
from schemas.redis_keys import input_image_key
from schemas.vocabulary import vocabulary_warnings
from workers.engine import Engine
from workers.errors import (
    EngineFailure,
    JobCanceled,
    JobEnded,
    JobTimedOut,
    RequestFailed,
    WorkerShuttingDown,
)
from workers.submission import Submission

log = logging.getLogger(__name__)

# The engine enforces each job's time limit between steps; the slot gives up waiting only this much
# later, when the engine itself must be stuck.
WAIT_SLACK_S = 60.0
WAIT_POLL_S = 1.0
DEFAULT_RQ_TIMEOUT_S = 180  # RQ's Queue.DEFAULT_TIMEOUT, for a job enqueued without job_timeout

# The word the per-job log line uses for each way a job can end (see workers/errors.py).
OUTCOMES: dict[type[JobEnded], str] = {
    JobCanceled: "canceled",
    JobTimedOut: "timed out",
    WorkerShuttingDown: "handed back",
}

_engine: Engine | None = None


def set_engine(engine: Engine | None) -> None:
    global _engine
    _engine = engine


def generate(params: dict) -> dict:
    """Generate the request's images; returns JobResult as a dict (PNG bytes live in Redis)."""
    job = get_current_job()
    job_id = job.id if job is not None else uuid.uuid4().hex
    try:
        request = Generation.model_validate(params)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in error.errors()[:5]
        )
        log.info("job %s failed: invalid params (%s)", job_id, problems)
        raise RequestFailed(f"invalid params: {problems}", ErrorType.INVALID_PARAMS) from None

    engine = _engine
    if engine is None:
        raise EngineFailure(
            "workers.job_function.generate runs only inside a worker process (python -m workers.main)"
        )
    try:
        inputs = input_images(job.connection if job is not None else None, request)
        check_loras(engine, request)
    except JobEnded as error:
        log.info("job %s failed: %s", job_id, error)
        raise
    submission = Submission(
        job_id,
        request,
        timeout_s=job_timeout_s(job),
        enqueued_at=job.enqueued_at.timestamp() if job is not None and job.enqueued_at else None,
        attempt=job.worker_name or "" if job is not None else "",
        inputs=inputs,
        warnings=vocabulary_warnings(request, engine.model.vocabulary),
    )
    publish_warnings(job, submission.warnings)
    outcome, detail = "succeeded", ""
    try:
        engine.submit(submission)
        _wait(submission, engine)
        return submission.outcome().model_dump()
    except JobEnded as error:
        outcome, detail = OUTCOMES.get(type(error), "failed"), f" [{error.error_type}: {error}]"
        raise
    finally:
        _log_job(submission, outcome, detail)


def publish_warnings(job: Job | None, warnings: list[str]) -> None:
    """Put the job's warnings in its meta (schemas/queue.py: WARNINGS_META) at once: the API shows
    them while it runs. Its result repeats them; a Redis error here costs the early view only."""
    if job is None or not warnings:
        return
    job.meta[WARNINGS_META] = warnings
    try:
        job.save_meta()
    except RedisError as error:
        log.warning("job %s: could not publish its warnings early: %s", job.id, error)


def input_images(connection: redis.Redis | None, request: Generation) -> ImageInputs | None:
    """The request's input images (None for text-to-image): read from Redis (schemas/redis_keys.py:
    input_image_key), decoded and fitted to its width x height (models/image_inputs.py). A missing or
    expired key, or a file that is not a usable image, is a RequestFailed (InvalidRequest) naming the
    field; Redis unreachable, an EngineFailure (retried while retries are left)."""
    if request.init_image is None:
        return None
    if connection is None:
        raise EngineFailure("an img2img job's input images are read through its RQ job's Redis connection")
    names = {"init_image": request.init_image}
    if request.mask_image is not None:
        names["mask_image"] = request.mask_image
    try:
        found = dict(
            zip(names, connection.mget([input_image_key(name) for name in names.values()]), strict=True)
        )
    except RedisError as error:
        raise EngineFailure(f"could not read the input images from Redis: {error}") from error
    for field, name in names.items():
        if found[field] is None:
            raise RequestFailed(
                f"{field}: no input image named {name!r} in Redis (it expired or was never stored)",
                ErrorType.INVALID_REQUEST,
            )
    try:
        return load_inputs(
            found["init_image"],
            found.get("mask_image"),
            request.width,
            request.height,
            request.resize_mode,
            request.mask_blur,
        )
    except InputImageError as error:
        raise RequestFailed(str(error), ErrorType.INVALID_REQUEST) from None


def check_loras(engine: Engine, request: Generation) -> None:
    """Read the request's LoRA files here, off the engine's thread (models/lora/library.py keeps them in
    host memory for the engine): a missing, corrupt or mismatched one fails this job alone, clearly."""
    if not request.loras:
        return
    library = getattr(engine.pipeline, "loras", None)
    if library is None:
        raise RequestFailed(
            "this worker serves no LoRAs (its SD_LORA_DIR is not set)", ErrorType.INVALID_REQUEST
        )
    try:
        library.check(request.loras)
    except LoraFileError as error:
        raise RequestFailed(str(error), ErrorType.INVALID_REQUEST) from None


def job_timeout_s(job: Job | None) -> float | None:
    """The job's time limit as RQ gives it (-1: none; unset: RQ's default)."""
    if job is None:
        return None
    timeout = job.timeout if job.timeout is not None else DEFAULT_RQ_TIMEOUT_S
    return None if float(timeout) < 0 else float(timeout)


def _wait(submission: Submission, engine: Engine) -> None:
    """Wait for the engine, with a bound: it must answer within the job's limit plus WAIT_SLACK_S, and
    while it waits the engine thread must be alive."""
    bound_s = None if submission.timeout_s is None else submission.timeout_s + WAIT_SLACK_S
    started = time.monotonic()
    while not submission.wait(WAIT_POLL_S):
        if not engine.alive:
            submission.fail(EngineFailure("the worker's engine stopped before finishing the job"))
        elif bound_s is not None and time.monotonic() - started > bound_s:
            log.error(
                "job %s: the engine gave no answer within %.0f s; giving up on it", submission.job_id, bound_s
            )
            submission.fail(EngineFailure(f"the worker's engine gave no answer within {bound_s:.0f} s"))


def _log_job(submission: Submission, outcome: str, detail: str) -> None:
    """The one INFO line per job."""
    params = submission.params
    now = time.time()
    admitted = submission.admitted_at
    queued = submission.enqueued_at if submission.enqueued_at is not None else submission.submitted_at
    queue_wait_s = (admitted if admitted is not None else now) - queued
    run_s = now - admitted if admitted is not None else 0.0
    log.info(
        "job %s %s: %dx%d, %d steps, %d image(s), guidance %g, queue wait %.2f s, run %.2f s%s",
        submission.job_id,
        outcome,
        params.width,
        params.height,
        params.steps,
        params.num_images,
        params.guidance_scale,
        max(0.0, queue_wait_s),
        run_s,
        detail,
    )
