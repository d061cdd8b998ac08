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
from dataclasses import dataclass, field
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
from schemas.queue import JOB_FUNCTION, WARNINGS_META, ImageRef, JobResult, JobStatus, queue_name
from schemas.redis_keys import (
    PREFIX,
    WEBHOOKS_PENDING_ZSET,
    cancel_key,
    image_key,
    model_workers_key,
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
    def __init__(self, depth: int, limit: int, retry_after_s: int, model: str) -> None:
        super().__init__(
            f"the queue is full for model {model} ({depth} jobs waiting, limit {limit}); retry in "
            f"{retry_after_s} s"
        )
        self.retry_after_s = retry_after_s
        self.model = model


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
    warnings: list[str] = field(default_factory=list)  # JobResult.warnings, or early ones from the meta
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass
class CancelOutcome:
    snapshot: JobSnapshot
    canceled_now: bool  # True: it was queued and is gone; False: a running job stops at its next step


def queue_key(model: str | None) -> str:
    """The Redis list of a model's queue (schemas/queue.py names it), as RQ keys it."""
    return Queue.redis_queue_namespace_prefix + queue_name(model or "")


def started_key(model: str) -> str:
    """The sorted set of a model's running jobs' executions (what RQ's StartedJobRegistry counts)."""
    return StartedJobRegistry.key_template.format(queue_name(model))


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings

    def queue(self, model: str) -> Queue:
        """The RQ queue of a model's jobs (one per model: schemas/queue.py)."""
        return Queue(queue_name(model), connection=self.redis, serializer=JSONSerializer)

    # --- submit -------------------------------------------------------------------------------

    def queue_depth(self, model: str) -> int:
        return self.redis.llen(queue_key(model))

    def submit(
        self, params: Generation, owner: str, webhook_url: str | None = None
    ) -> tuple[str, JobStatus, int | None]:
        """Enqueue a job on its model's queue (`params.model`, chosen by service/model_routing.py) unless
        SD_MAX_QUEUE_DEPTH jobs already wait there (QueueFull): the depth check and the enqueue are one
        transaction (WATCH on the queue), so concurrent posts never overshoot.
        A `webhook_url` (already checked: service/webhook_url.py) goes in the job's meta, beside the
        generation, and the job joins the pending webhooks in the same transaction.
        Returns the id, the status (queued) and the position (jobs ahead: 0 is next)."""
        settings = self.settings
        if params.model is None:
            raise ValueError("a job needs its model (service/model_routing.py: choose_model)")
        queue = self.queue(params.model)
        meta: dict[str, str] = {"owner": owner}
        if webhook_url is not None:
            meta["webhook_url"] = webhook_url
        job = queue.create_job(
            JOB_FUNCTION,
            # defaults left out: a worker that predates an optional field still takes the job
            kwargs={"params": params.model_dump(exclude_defaults=True)},
            job_id=uuid.uuid4().hex,
            description="generate",  # RQ's default repeats the whole prompt
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.result_ttl_s,
            timeout=settings.job_timeout_s,
            retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None,
            meta=meta,
        )
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(queue.key)
                    depth = pipe.llen(queue.key)
                    if depth >= settings.max_queue_depth:
                        raise QueueFull(depth, settings.max_queue_depth, settings.retry_after_s, params.model)
                    pipe.multi()
                    queue.enqueue_job(job, pipeline=pipe)
                    if webhook_url is not None:
                        pipe.zadd(WEBHOOKS_PENDING_ZSET, {job.id: time.time()})
                    pipe.execute()
                    break
                except WatchError:
                    continue  # another post (or a worker's take) changed the queue: look again
        position = self.position(job.id, self.redis.lpos(queue.key, job.id), params.model)
        return job.id, JobStatus.QUEUED, position

    def position(self, job_id: str, queue_index: int | None, model: str | None) -> int:
        """Jobs ahead of a queued job of `model`: those its model's live workers hold that have not
        taken their first step (enqueued before it), then those ahead of it in its model's queue
        (`queue_index`, its LPOS; None: a worker took it and has not listed it yet: behind every
        listed one). Other models' jobs never count: they wait for other workers."""
        stale_before = time.time() - self.settings.worker_stale_s
        workers_key = model_workers_key(model or "")
        names = [_text(n) for n in self.redis.zrangebyscore(workers_key, stale_before, "+inf")]
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
        params = _params_of(job)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpos(queue_key(params.model), job.id)
            pipe.hmget(progress_key(job.id), ["step", "total_steps", "attempt"])
            pipe.exists(cancel_key(job.id))
            pipe.exists(preview_key(job.id))
            queue_index, (step, total_steps, attempt), cancel_requested, has_preview = pipe.execute()

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
            queue_position=self.position(job.id, queue_index, params.model)
            if status is JobStatus.QUEUED
            else None,
            step=_int(step, 0) if status is not JobStatus.QUEUED else 0,
            total_steps=_int(total_steps, params.steps_to_run),
            cancel_requested=bool(cancel_requested),
            preview_ready=bool(has_preview) and params.preview and status is JobStatus.RUNNING,
            warnings=_early_warnings(job),
            created_at=job.created_at,
            started_at=job.started_at if status is not JobStatus.QUEUED else None,
            finished_at=job.ended_at if status in TERMINAL else None,
        )
        if status is JobStatus.SUCCEEDED:
            snap.step = snap.total_steps = params.steps_to_run  # img2img: int(steps * strength)
            snap.result = _result_of(job)
            if snap.result is not None:
                snap.warnings = snap.result.warnings
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

    def image_ref(self, job: Job, index: int, extension: str | None = None) -> ImageRef:
        """Image `index` of a succeeded job; with `extension`, it must be the image's format (png,
        jpeg, webp): ImageNotFound naming the right one otherwise."""
        status = api_status(job.get_status(refresh=False))
        if status is not JobStatus.SUCCEEDED:
            raise ImageNotFound(f"job {job.id} is {status.value}: its images exist once it succeeded")
        result = _result_of(job)
        refs = {ref.index: ref for ref in result.images} if result else {}
        if index not in refs:
            raise ImageNotFound(
                f"job {job.id} has no image {index} (it has {len(refs)}: indexes 0 to {len(refs) - 1})"
            )
        ref = refs[index]
        if extension is not None and extension != ref.format:
            raise ImageNotFound(
                f"image {index} of job {job.id} is a {ref.format} file: its URL ends in {index}.{ref.format}"
            )
        return ref

    def image(self, job: Job, index: int, extension: str | None = None) -> tuple[bytes, int]:
        """The file of image `index` (in the job's output format; `extension`: see image_ref) and the
        seconds it has left in Redis."""
        ref = self.image_ref(job, index, extension)
        key = ref.key or image_key(job.id, ref.index)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.ttl(key)
            data, ttl_s = pipe.execute()
        if data is None:
            raise ImageNotFound(f"image {index} of job {job.id} has expired")
        return data, max(int(ttl_s), 0)

    def fetch(self, job_id: str) -> Job | None:
        """Any owner's job, or None (the API's own background work: webhooks)."""
        try:
            return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None

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


def _early_warnings(job: Job) -> list[str]:
    """The warnings a worker put in the job's meta when it took it (workers/job_function.py)."""
    warnings = job.meta.get(WARNINGS_META)
    if not isinstance(warnings, list):
        return []
    return [warning for warning in warnings if isinstance(warning, str)]


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
