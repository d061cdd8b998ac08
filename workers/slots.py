"""Slot threads: K RQ workers in one process, each taking one job at a time and feeding the engine.

`SlotWorker` is RQ's SimpleWorker (no fork: the model and CUDA stay in this process), changed where
a thread among others needs it:
- no death penalty: SIGALRM works only in the main thread, and the engine enforces time limits
  between steps anyway; no signal handlers either (workers/main.py owns SIGTERM/SIGINT);
- a short heartbeat TTL for its running job (SD_JOB_HEARTBEAT_TTL_S), kept alive by
  workers/heartbeat.py while the process lives, so a SIGKILLed worker's job expires from RQ's
  StartedJobRegistry within that TTL and the janitor retries it;
- dequeuing in short polls, so a drain stops taking jobs within about a second, with quick
  reconnection when Redis comes back;
- the job's ending as the engine reports it: canceled jobs end CANCELED (CanceledJobRegistry),
  jobs a draining worker could not finish go back to the front of the queue, and failures that
  would only repeat (invalid request, timeout) are not retried. See workers/errors.py.

`SlotPool` runs the slots, each in a thread that starts a fresh RQ worker if its loop ever dies
(e.g. Redis went away in the middle of RQ's bookkeeping).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis
from redis.exceptions import RedisError
from rq.exceptions import DequeueTimeout
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import CanceledJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from schemas.jobs import QUEUE_NAME
from workers.errors import JobCanceled, JobEnded, WorkerShuttingDown

log = logging.getLogger(__name__)

POLL_S = 1  # BLMOVE timeout: how soon an idle slot notices a stop request
ROOM_POLL_S = 0.02  # how often a slot looks again whether the engine has room for another job
RESTART_BACKOFF_S = (1.0, 5.0)  # first and longest wait before a dead slot loop is restarted


class NoDeathPenalty(BaseDeathPenalty):
    """RQ arms a death penalty around every job; ours is a no-op (see the module docstring)."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class SlotWorker(SimpleWorker):
    death_penalty_class = NoDeathPenalty
    log_result_lifespan = False
    max_connection_wait_time = 5.0  # RQ's backoff grows to 60 s: reconnect sooner

    def __init__(
        self,
        *args,
        job_heartbeat_ttl_s: int,
        maintenance: Callable[[SlotWorker], None] | None = None,
        has_room: Callable[[], bool] | None = None,
        **kwargs,
    ) -> None:
        self.job_heartbeat_ttl_s = job_heartbeat_ttl_s
        self._maintenance = maintenance
        self._has_room = has_room
        self._outcomes: dict[str, BaseException] = {}  # job id -> exception it raised, until handled
        self.running: tuple[Job, object] | None = None  # (job, RQ execution), read by the heartbeat thread
        kwargs.setdefault("log_job_description", False)
        super().__init__(*args, **kwargs)
        # RQ would sweep the registries as soon as the loop starts; right after a Redis outage that
        # could fail live workers' jobs before their heartbeats resume, so the first sweep waits too
        self.last_cleaned_at = now()

    # --- a thread among others -------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        pass  # signal.signal works only in the main thread, which handles SIGTERM for the whole process

    def request_stop_dequeuing(self) -> None:
        self._stop_requested = True

    @property
    def dequeue_timeout(self) -> int:
        return POLL_S  # RQ also sizes the socket timeout from it: POLL_S + 10 s

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.job_heartbeat_ttl_s

    def run_maintenance_tasks(self) -> None:
        """RQ's periodic registry cleanup (every 10 min): the janitor's sweep, as a fallback."""
        self.last_cleaned_at = now()
        if self._maintenance is not None:
            try:
                self._maintenance(self)
            except RedisError as error:
                log.warning("slot %s: maintenance skipped (%s)", self.name, error)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """Like RQ's, but returns None within POLL_S of a stop request, and rides out Redis outages."""
        wait_s = 1.0
        idle_set = False
        last_beat = 0.0
        while not self._stop_requested:
            if self._has_room is not None and not self._has_room():
                # The engine still holds jobs waiting to join its batch: leave new ones in the queue,
                # where a worker with room can take them (and where the API shows them as queued).
                if time.monotonic() - last_beat >= POLL_S:
                    with contextlib.suppress(RedisError):
                        self.heartbeat()
                    last_beat = time.monotonic()
                time.sleep(ROOM_POLL_S)
                continue
            try:
                if not idle_set:
                    self.set_state(WorkerStatus.IDLE)
                    idle_set = True
                self.heartbeat()
                last_beat = time.monotonic()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                result = self.queue_class.dequeue_any(
                    self._ordered_queues,
                    POLL_S,
                    connection=self.connection,
                    job_class=self.job_class,
                    serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
            except DequeueTimeout:
                continue
            except (redis.ConnectionError, redis.TimeoutError) as error:
                log.warning("slot %s: Redis unreachable (%s); retrying in %.0f s", self.name, error, wait_s)
                time.sleep(wait_s)
                wait_s = min(wait_s * 2, self.max_connection_wait_time)
                continue
            if wait_s > 1.0:
                log.info("slot %s: Redis reachable again", self.name)
                wait_s = 1.0
            if result is not None:
                job, _ = result
                job.redis_server_version = self.get_redis_server_version()
                log.debug("slot %s: took job %s", self.name, job.id)
                return result
        return None

    # --- one job --------------------------------------------------------------------------------------

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
        if isinstance(error, JobCanceled):
            self._end_canceled(job)
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

    def _end_canceled(self, job: Job) -> None:
        """RQ status CANCELED, in the CanceledJobRegistry, as RQ's own job.cancel() leaves a job."""
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.CANCELED, pipeline=pipe)
            pipe.hset(job.key, "ended_at", utcformat(job.ended_at or now()))
            self.cleanup_execution(job, pipeline=pipe)
            CanceledJobRegistry(
                job.origin, self.connection, job_class=self.job_class, serializer=self.serializer
            ).add(job, pipeline=pipe)
            job.cleanup(
                ttl=job.get_result_ttl(self.default_result_ttl), pipeline=pipe, remove_from_queue=False
            )
            pipe.execute()

    def _give_back(self, job: Job, queue: Queue) -> None:
        """Back to the FRONT of the queue, status queued, retries untouched: another worker takes it next."""
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe)
            job.started_at = None
            job.ended_at = None
            job.worker_name = None
            # RQ's public enqueue_job WATCHes inside our pipeline, which already holds commands
            queue._enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()
        log.info("job %s handed back to the front of the queue", job.id)

    def _record_error(self, job: Job, error: BaseException) -> None:
        """job.meta["error"] = {type, message}: what the API shows for a failed job."""
        if isinstance(error, JobEnded):
            job.meta["error"] = {"type": error.error_type, "message": error.message}
        else:
            job.meta["error"] = {"type": type(error).__name__, "message": str(error) or type(error).__name__}
        try:
            job.save_meta()
        except RedisError as redis_error:
            log.warning("job %s: could not save its error in meta (%s)", job.id, redis_error)


class SlotPool:
    """K slot threads; each runs a SlotWorker and starts a fresh one if that worker's loop dies."""

    def __init__(
        self,
        count: int,
        worker_name: str,
        connect: Callable[[], redis.Redis],
        job_heartbeat_ttl_s: int,
        result_ttl_s: int,
        maintenance: Callable[[SlotWorker], None] | None = None,
        has_room: Callable[[], bool] | None = None,
    ) -> None:
        self.count = count
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
                    [QUEUE_NAME],
                    name=name,
                    connection=self._connect(),
                    serializer=JSONSerializer,
                    default_result_ttl=self._result_ttl_s,
                    worker_ttl=max(60, 2 * self._job_heartbeat_ttl_s),
                    job_heartbeat_ttl_s=self._job_heartbeat_ttl_s,
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
