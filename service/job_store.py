"""All of the API's RQ and Redis access for jobs: submit, look up, cancel, read images.

Synchronous (RQ is): called from plain `def` routes, which FastAPI runs in its thread pool, so
the event loop is never blocked. Redis errors propagate; the app turns them into 503 answers.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

import redis
from pydantic import ValidationError
from redis.exceptions import WatchError
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from schemas.generation import Generation
from schemas.queue import JOB_FUNCTION, QUEUE_NAME, JobResult, JobStatus
from schemas.redis_keys import (
    PREFIX,
    WORKERS_ZSET,
    cancel_key,
    image_key,
    preview_key,
    progress_key,
    waiting_key,
)
from service.job_status import TERMINAL, api_status, error_from_exc_string, error_from_meta
from service.settings import Settings

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex: 122 random bits


def seen_key(job_id: str) -> str:
    """Set once by whichever API process first sees a job finished, so metrics count each job once."""
    return f"{PREFIX}api:seen:{job_id}"


class QueueFull(RuntimeError):
    def __init__(self, depth: int, limit: int, retry_after_s: int) -> None:
        super().__init__(
            f"the queue is full ({depth} jobs waiting, limit {limit}); retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class JobNotFound(LookupError):
    """Unknown, expired, malformed, or another key's job: all look the same to a client."""


class JobConflict(RuntimeError):
    """The job is in a state that forbids the operation (e.g. canceling a finished job)."""


class ImageNotFound(LookupError):
    pass


@dataclass
class JobSnapshot:
    """What one GET sees of a job, before it is shaped into the public JobView."""

    id: str
    status: JobStatus
    params: Generation
    queue_position: int | None = None
    step: int = 0
    total_steps: int = 0
    result: JobResult | None = None
    error: tuple[str, str] | None = None
    cancel_requested: bool = False
    preview_ready: bool = False  # running, asked for a preview, and the worker has published one
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass
class CancelOutcome:
    snapshot: JobSnapshot
    canceled_now: bool  # True: it was queued and is gone; False: a running job stops at its next step


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.queue = Queue(QUEUE_NAME, connection=client, serializer=JSONSerializer)
        # Sorted set of running jobs' executions (what RQ's StartedJobRegistry counts).
        self.started_key = StartedJobRegistry(queue=self.queue).key

    # --- submit -------------------------------------------------------------------------------

    def queue_depth(self) -> int:
        return self.redis.llen(self.queue.key)

    def submit(self, params: Generation, owner: str) -> tuple[str, JobStatus, int | None]:
        """Enqueue a job unless SD_MAX_QUEUE_DEPTH jobs already wait (QueueFull): the depth check and
        the enqueue are one transaction (WATCH on the queue), so concurrent posts never overshoot.
        Returns the id, the status (queued) and the position (jobs ahead: 0 is next)."""
        settings = self.settings
        job = self.queue.create_job(
            JOB_FUNCTION,
            # defaults left out: a worker that predates an optional field still takes the job
            kwargs={"params": params.model_dump(exclude_defaults=True)},
            job_id=uuid.uuid4().hex,
            description="generate",  # RQ's default repeats the whole prompt
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.result_ttl_s,
            timeout=settings.job_timeout_s,
            retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None,
            meta={"owner": owner},
        )
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.queue.key)
                    depth = pipe.llen(self.queue.key)
                    if depth >= settings.max_queue_depth:
                        raise QueueFull(depth, settings.max_queue_depth, settings.retry_after_s)
                    pipe.multi()
                    self.queue.enqueue_job(job, pipeline=pipe)
                    pipe.execute()
                    break
                except WatchError:
                    continue  # another post (or a worker's take) changed the queue: look again
        return job.id, JobStatus.QUEUED, self.position(job.id, self.redis.lpos(self.queue.key, job.id))

    def position(self, job_id: str, queue_index: int | None) -> int:
        """Jobs ahead of a queued job: those the live workers hold that have not taken their first
        step (enqueued before it), then those ahead of it in the queue (`queue_index`, its LPOS; None:
        a worker took it and has not listed it yet: behind every listed one)."""
        stale_before = time.time() - self.settings.worker_stale_s
        names = [_text(n) for n in self.redis.zrangebyscore(WORKERS_ZSET, stale_before, "+inf")]
        if not names:
            return queue_index or 0
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zscore(waiting_key(name), job_id)
                pipe.zcard(waiting_key(name))
            replies = pipe.execute()
        scores = [score for score in replies[0::2] if score is not None]
        if not scores:
            return sum(replies[1::2]) + (queue_index or 0)
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zcount(waiting_key(name), "-inf", f"({scores[0]}")
            return sum(pipe.execute())

    # --- look up ------------------------------------------------------------------------------

    def find(self, job_id: str, owner: str) -> Job:
        """The job, if it exists and belongs to `owner` ("" when auth is off: every job is visible)."""
        if not JOB_ID.match(job_id):
            raise JobNotFound(job_id)
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            raise JobNotFound(job_id) from None
        job_owner = job.meta.get("owner", "")
        if owner and not (isinstance(job_owner, str) and hmac.compare_digest(job_owner, owner)):
            raise JobNotFound(job_id)
        return job

    def snapshot(self, job: Job) -> JobSnapshot:
        """Status, position, progress, result and error of a fetched job (one to three round trips).

        Running means: a worker has taken the job's current attempt AND it has taken its first step
        (its progress names that attempt). Until then the job is queued, also while a worker holds it
        waiting for room in its batch, with a position that counts those waiting in workers too.
        """
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpos(self.queue.key, job.id)
            pipe.hmget(progress_key(job.id), ["step", "total_steps", "attempt"])
            pipe.exists(cancel_key(job.id))
            pipe.exists(preview_key(job.id))
            queue_index, (step, total_steps, attempt), cancel_requested, has_preview = pipe.execute()

        params = _params_of(job)
        status = api_status(job.get_status(refresh=False))
        if status in (JobStatus.QUEUED, JobStatus.RUNNING):
            stepping = (
                attempt is not None and job.worker_name is not None and _text(attempt) == job.worker_name
            )
            status = JobStatus.RUNNING if stepping else JobStatus.QUEUED
        error = error_from_meta(job.meta) or _error_of(job) if status is JobStatus.FAILED else None
        snap = JobSnapshot(
            id=job.id,
            status=status,
            params=params,
            queue_position=self.position(job.id, queue_index) if status is JobStatus.QUEUED else None,
            step=_int(step, 0) if status is not JobStatus.QUEUED else 0,
            total_steps=_int(total_steps, params.steps),
            cancel_requested=bool(cancel_requested),
            preview_ready=bool(has_preview) and params.preview and status is JobStatus.RUNNING,
            created_at=job.created_at,
            started_at=job.started_at if status is not JobStatus.QUEUED else None,
            finished_at=job.ended_at if status in TERMINAL else None,
        )
        if status is JobStatus.SUCCEEDED:
            snap.step = snap.total_steps = params.steps
            snap.result = _result_of(job)
        elif status is JobStatus.FAILED:
            snap.error = error
        return snap

    def first_time_seen_finished(self, job_id: str) -> bool:
        """True for exactly one caller across all API processes (metrics count each job once)."""
        return bool(self.redis.set(seen_key(job_id), b"1", nx=True, ex=self.settings.result_ttl_s))

    # --- cancel -------------------------------------------------------------------------------

    def cancel(self, job: Job) -> CancelOutcome:
        """Cancel a queued job at once, ask a running one to stop; JobConflict if it already ended."""
        snap = self.snapshot(job)
        if snap.status is JobStatus.CANCELED:
            return CancelOutcome(snap, canceled_now=False)  # idempotent
        if snap.status in TERMINAL:
            raise JobConflict(f"job {job.id} already {snap.status.value}; nothing to cancel")
        # Set the engine's flag first: a job a worker takes right now still stops at its first step.
        ttl_s = self.settings.result_ttl_s + self.settings.job_timeout_s
        self.redis.set(cancel_key(job.id), b"1", ex=ttl_s)
        canceled_now = snap.status is JobStatus.QUEUED and self._cancel_if_still_queued(job)
        return CancelOutcome(self.snapshot(self._refetch(job)), canceled_now=canceled_now)

    def _cancel_if_still_queued(self, job: Job) -> bool:
        """RQ's job.cancel() in a transaction that aborts if a worker took the job meanwhile."""
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(job.key)
                status = pipe.hget(job.key, "status")
                if api_status(status.decode() if status else None) is not JobStatus.QUEUED:
                    return False
                pipe.multi()
                job.cancel(pipeline=pipe)
                # A canceled job leaves every registry that expires things: give its hash a TTL.
                pipe.expire(job.key, self.settings.result_ttl_s)
                pipe.execute()
                return True
            except WatchError:
                return False  # a worker started it: the cancel key stops it at its next step
            except InvalidJobOperation:
                return False  # a concurrent DELETE canceled it between our read and RQ's own check

    def _refetch(self, job: Job) -> Job:
        try:
            return Job.fetch(job.id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            raise JobNotFound(job.id) from None

    # --- images -------------------------------------------------------------------------------

    def image(self, job: Job, index: int) -> tuple[bytes, int]:
        """PNG bytes of image `index` and the seconds it has left in Redis."""
        status = api_status(job.get_status(refresh=False))
        if status is not JobStatus.SUCCEEDED:
            raise ImageNotFound(f"job {job.id} is {status.value}: its images exist once it succeeded")
        result = _result_of(job)
        keys = {ref.index: ref.key or image_key(job.id, ref.index) for ref in result.images} if result else {}
        if index not in keys:
            raise ImageNotFound(
                f"job {job.id} has no image {index} (it has {len(keys)}: indexes 0 to {len(keys) - 1})"
            )
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys[index])
            pipe.ttl(keys[index])
            data, ttl_s = pipe.execute()
        if data is None:
            raise ImageNotFound(f"image {index} of job {job.id} has expired")
        return data, max(int(ttl_s), 0)

    def preview(self, job: Job) -> bytes:
        """The running job's latest preview PNG (ImageNotFound when there is none)."""
        if not _params_of(job).preview:
            raise ImageNotFound(f"job {job.id} was not submitted with preview: true")
        data = self.redis.get(preview_key(job.id))
        if data is None:
            raise ImageNotFound(f"job {job.id} has no preview now (not started yet, or already ended)")
        return data


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _int(raw: bytes | None, default: int) -> int:
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


def _params_of(job: Job) -> Generation:
    return Generation.model_validate(job.kwargs["params"])


def _result_of(job: Job) -> JobResult | None:
    latest = job.latest_result()
    if latest is None or latest.type != Result.Type.SUCCESSFUL:
        return None
    try:
        return JobResult.model_validate(latest.return_value)
    except ValidationError as error:
        log.error("job %s returned a malformed result: %s", job.id, error.errors(include_input=False)[:3])
        return None


def _error_of(job: Job) -> tuple[str, str]:
    latest = job.latest_result()
    if latest is not None and latest.type == Result.Type.FAILED:
        return error_from_exc_string(latest.exc_string)
    return error_from_exc_string(None)
