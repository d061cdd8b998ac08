"""Slot threads: K RQ workers in one process, each taking one job at a time and feeding the engine.

`SlotWorker` is RQ's SimpleWorker made fit for a thread (workers/rq_internals.py), plus:
- a short heartbeat TTL for its running job (SD_JOB_HEARTBEAT_TTL_S), kept alive by
  workers/heartbeat.py while the process lives, so a SIGKILLed worker's job expires from RQ's
  StartedJobRegistry within that TTL and the janitor retries it;
- the job's ending as the engine reports it (`EngineEndings`): canceled jobs end CANCELED
  (CanceledJobRegistry), jobs a draining worker could not finish go back to the front of the
  queue, and failures that would only repeat (invalid request, timeout) are not retried. See
  workers/errors.py.

`SlotPool` runs the slots, each in a thread that starts a fresh RQ worker if its loop ever dies
(e.g. Redis went away in the middle of RQ's bookkeeping).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from workers.errors import JobCanceled, JobEnded, WorkerShuttingDown
from workers.redis_outage import retry_while_unavailable
from workers.rq_internals import ThreadedWorker, end_canceled, enqueue_at_front

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 5.0)  # first and longest wait before a dead slot loop is restarted


class EngineEndings(SimpleWorker):
    """RQ's bookkeeping of a job's end, told apart by how the engine ended it (workers/errors.py),
    and waiting out a Redis outage instead of failing half-way (which would leave the job for the
    janitor, spending a retry): `redis_outage_wait_s` bounds that wait."""

    def __init__(self, *args, redis_outage_wait_s: float = 600.0, **kwargs) -> None:
        self._outcomes: dict[str, BaseException] = {}  # job id -> exception it raised, until handled
        self.running: tuple[Job, object] | None = None  # (job, RQ execution), read by the heartbeat thread
        self.redis_outage_wait_s = redis_outage_wait_s
        super().__init__(*args, **kwargs)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        retry_while_unavailable(
            lambda: super(EngineEndings, self).handle_execution_ended(job, queue, heartbeat_ttl),
            self.redis_outage_wait_s,
        )

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry) -> None:
        retry_while_unavailable(
            lambda: super(EngineEndings, self).handle_job_success(job, queue, started_job_registry),
            self.redis_outage_wait_s,
        )

    def perform_job(self, job: Job, queue: Queue) -> bool:
        self.running = (job, self.execution)
        try:
            return super().perform_job(job, queue)
        finally:
            self.running = None
            self._outcomes.pop(job.id, None)

    def handle_exception(self, job: Job, *exc_info) -> None:
        error = exc_info[1]
        self._outcomes[job.id] = error
        if isinstance(error, JobEnded):
            return  # an ending the engine reported (logged by the job function), not a crash to trace
        super().handle_exception(job, *exc_info)

    def handle_job_failure(
        self, job: Job, queue: Queue, started_job_registry=None, exc_string: str = ""
    ) -> None:
        error = self._outcomes.pop(job.id, None)
        retry_while_unavailable(
            lambda: self._record_ending(job, queue, error, started_job_registry, exc_string),
            self.redis_outage_wait_s,
        )

    def _record_ending(
        self, job: Job, queue: Queue, error: BaseException | None, started_job_registry, exc_string: str
    ) -> None:
        if isinstance(error, JobCanceled):
            end_canceled(self, job)
            return
        if isinstance(error, WorkerShuttingDown):
            self._give_back(job, queue)
            return
        if isinstance(error, JobEnded) and not error.retryable:
            job.retries_left = 0  # it would only fail again
        if error is not None and not job.should_retry:
            self._record_error(job, error)
        super().handle_job_failure(
            job, queue, started_job_registry=started_job_registry, exc_string=exc_string
        )

    def _give_back(self, job: Job, queue: Queue) -> None:
        """Back to the FRONT of the queue, status queued, retries untouched: another worker takes it next."""
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe)
            enqueue_at_front(queue, job, pipe)
            pipe.execute()
        log.info("job %s handed back to the front of the queue", job.id)

    def _record_error(self, job: Job, error: BaseException) -> None:
        """job.meta["error"] = {type, message}: what the API shows for a failed job. An unexpected
        exception gives its class name, unless the job function described its failure itself."""
        if isinstance(error, JobEnded):
            job.meta["error"] = {"type": error.error_type.value, "message": error.message}
        elif "error" not in job.meta:
            job.meta["error"] = {"type": type(error).__name__, "message": str(error) or type(error).__name__}
        job.save_meta()


class SlotWorker(EngineEndings, ThreadedWorker):
    def __init__(self, *args, job_heartbeat_ttl_s: int, **kwargs) -> None:
        self.job_heartbeat_ttl_s = job_heartbeat_ttl_s
        super().__init__(*args, **kwargs)

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.job_heartbeat_ttl_s


class SlotPool:
    """K slot threads; each runs a SlotWorker on `queue` (the worker's model's: schemas/queue.py) and
    starts a fresh one if that worker's loop dies."""

    def __init__(
        self,
        count: int,
        worker_name: str,
        queue: str,
        connect: Callable[[], redis.Redis],
        job_heartbeat_ttl_s: int,
        result_ttl_s: int,
        maintenance: Callable[[SlotWorker], None] | None = None,
        has_room: Callable[[], bool] | None = None,
        redis_outage_wait_s: float = 600.0,
    ) -> None:
        self.count = count
        self.queue = queue
        self._redis_outage_wait_s = redis_outage_wait_s
        self._has_room = has_room
        self.worker_name = worker_name
        self._connect = connect
        self._job_heartbeat_ttl_s = job_heartbeat_ttl_s
        self._result_ttl_s = result_ttl_s
        self._maintenance = maintenance
        self._token = uuid.uuid4().hex[:6]  # RQ names must be unique even when SD_WORKER_NAME is reused
        self._stopping = threading.Event()
        self._workers: list[SlotWorker | None] = [None] * count
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.count):
            thread = threading.Thread(target=self._run, args=(index,), name=f"sd-slot-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop_dequeuing(self) -> None:
        """Drain: take no new jobs; jobs already taken run to their end."""
        self._stopping.set()
        for worker in self._workers:
            if worker is not None:
                worker.request_stop_dequeuing()

    def join(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def busy(self) -> list[SlotWorker]:
        return [w for w in self._workers if w is not None and w.running is not None]

    def _run(self, index: int) -> None:
        backoff_s, generation = RESTART_BACKOFF_S[0], 0
        while not self._stopping.is_set():
            name = f"{self.worker_name}.slot{index}.{self._token}" + (f".{generation}" if generation else "")
            try:
                worker = SlotWorker(
                    [self.queue],
                    name=name,
                    connection=self._connect(),
                    serializer=JSONSerializer,
                    default_result_ttl=self._result_ttl_s,
                    worker_ttl=max(60, 2 * self._job_heartbeat_ttl_s),
                    job_heartbeat_ttl_s=self._job_heartbeat_ttl_s,
                    redis_outage_wait_s=self._redis_outage_wait_s,
                    maintenance=self._maintenance,
                    has_room=self._has_room,
                )
                self._workers[index] = worker
                if self._stopping.is_set():
                    break
                worker.work(with_scheduler=False)
            except Exception:
                log.exception("slot %d: the RQ worker loop failed", index)
            finally:
                self._workers[index] = None
            if self._stopping.is_set():
                break
            # RQ's loop ends only on errors it cannot ride out (e.g. Redis lost mid-bookkeeping)
            log.warning("slot %d: RQ worker loop ended; starting a new one in %.0f s", index, backoff_s)
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, RESTART_BACKOFF_S[1])
            generation += 1
