"""Every place we lean on RQ beyond its documented API, in one module.

Checked against RQ 2.12 (pyproject pins rq>=2.12,<3); tests/workers/test_rq_internals.py fails
when an RQ upgrade moves anything used here:
- `ThreadedWorker`: RQ's SimpleWorker overridden where a thread among others in one process needs
  it (no signals, no death penalty, short dequeue polls that a stop request ends, a command channel
  that stops within a second) and where our job endings replace RQ's failure bookkeeping;
- `AllowlistedJob`: a job may only run our own job functions, never what its hash names;
- `enqueue_at_front`: a job handed back by a draining worker (RQ's `Queue._enqueue_job`);
- `end_canceled`: a canceled job recorded as `job.cancel()` leaves it;
- `KEEP_JOB_ALIVE`: a Lua script that knows the layout of RQ's started and execution registries.

Imports no torch: the janitor (API image) uses `AllowlistedJob` too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq.exceptions import DequeueTimeout
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import CanceledJobRegistry
from rq.timeouts import BaseDeathPenalty
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from schemas.queue import JOB_FUNCTIONS
from workers.redis_outage import OUTAGE

log = logging.getLogger(__name__)

RQ_CHECKED_VERSIONS = ">=2.12,<2.13"  # what this module was read against; the test says when it moved

POLL_S = 0.5  # BLMOVE timeout and command-channel poll (s): how soon an idle slot notices a stop
ROOM_POLL_S = 0.02  # how often a slot looks again whether its owner has room for another job
PUBSUB_JOIN_S = 1.0  # longest wait for the command channel's thread on exit


class ForbiddenJob(RuntimeError):
    """A job names a function (or a callback) that is not one of ours: it is never imported."""


class AllowlistedJob(Job):
    """A job that runs only `JOB_FUNCTIONS`: whoever can write to Redis cannot make a worker import
    and call another function (the JSON serializer already rules out pickle). Callbacks, which RQ
    would import and call too, are refused the same way."""

    @property
    def func(self):  # type: ignore[override]
        if self.func_name not in JOB_FUNCTIONS or self.instance is not None:
            message = (
                f"job {self.id} names {self.func_name!r}, which is not a job function of this service "
                f"(allowed: {', '.join(sorted(JOB_FUNCTIONS))}); refused without importing it"
            )
            # loud: only someone writing to Redis directly can enqueue such a job
            log.error("REFUSED %s: whoever can write to this Redis tried to run code on the workers", message)
            raise ForbiddenJob(message)
        return super().func

    def send_webhooks(self, status, *, exc_string=None) -> None:  # type: ignore[override]
        """RQ's own webhooks would make the worker POST wherever a job's hash says: none are sent."""
        if self.webhooks:
            log.error("REFUSED job %s's RQ webhooks: this service sends none from its workers", self.id)

    def _refuse_callback(self, name: str | None) -> None:
        if name:
            raise ForbiddenJob(f"job {self.id} names a callback {name!r}; this service runs none")

    @property
    def success_callback(self):  # type: ignore[override]
        self._refuse_callback(self._success_callback_name)
        return None

    @property
    def failure_callback(self):  # type: ignore[override]
        self._refuse_callback(self._failure_callback_name)
        return None

    @property
    def stopped_callback(self):  # type: ignore[override]
        self._refuse_callback(self._stopped_callback_name)
        return None


class NoDeathPenalty(BaseDeathPenalty):
    """RQ arms a death penalty around every job; SIGALRM works only in the main thread, and the
    engine enforces time limits between steps anyway."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class ThreadedWorker(SimpleWorker):
    """RQ's SimpleWorker (no fork: the model and CUDA stay in this process) as one thread among others.

    `has_room()`: while it answers False, the worker takes no job (it stays in the queue, where a
    worker with room can take it). `maintenance(worker)`: RQ's periodic registry cleanup, replaced.
    """

    death_penalty_class = NoDeathPenalty
    job_class = AllowlistedJob
    log_result_lifespan = False
    max_connection_wait_time = 5.0  # RQ's backoff grows to 60 s: reconnect sooner

    def __init__(
        self,
        *args,
        maintenance: Callable[[ThreadedWorker], None] | None = None,
        has_room: Callable[[], bool] | None = None,
        **kwargs,
    ) -> None:
        self._maintenance = maintenance
        self._has_room = has_room
        kwargs.setdefault("log_job_description", False)
        kwargs.setdefault("job_class", AllowlistedJob)
        super().__init__(*args, **kwargs)
        # RQ would sweep the registries as soon as the loop starts; right after a Redis outage that
        # could fail live workers' jobs before their heartbeats resume, so the first sweep waits too
        self.last_cleaned_at = now()

    def _install_signal_handlers(self) -> None:
        pass  # signal.signal works only in the main thread, which handles SIGTERM for the whole process

    def request_stop_dequeuing(self) -> None:
        self._stop_requested = True

    @property
    def dequeue_timeout(self) -> float:
        return POLL_S  # RQ also sizes the socket timeout from it: POLL_S + 10 s

    def subscribe(self) -> None:
        """RQ's command channel, polled every POLL_S instead of every 60 s: its thread, joined on
        exit, then ends within a second instead of up to a minute."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def unsubscribe(self) -> None:
        if self.pubsub_thread is None:
            return
        with contextlib.suppress(RedisError):
            self.pubsub.unsubscribe()
        self.pubsub_thread.stop(timeout=PUBSUB_JOIN_S)
        with contextlib.suppress(RedisError):
            self.pubsub.close()

    def run_maintenance_tasks(self) -> None:
        """RQ's periodic registry cleanup (every 10 min): the janitor's sweep, as a fallback."""
        self.last_cleaned_at = now()
        if self._maintenance is not None:
            try:
                self._maintenance(self)
            except RedisError as error:
                log.warning("worker %s: maintenance skipped (%s)", self.name, error)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """Like RQ's, but returns None within POLL_S of a stop request, takes nothing while
        `has_room()` says no, and rides out Redis outages with one line each way."""
        wait_s = 1.0
        idle_set = False
        last_beat = 0.0
        while not self._stop_requested:
            if self._has_room is not None and not self._has_room():
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
                OUTAGE.failed(error)  # one line per outage for the whole process
                time.sleep(wait_s)
                wait_s = min(wait_s * 2, self.max_connection_wait_time)
                continue
            OUTAGE.answered()
            wait_s = 1.0
            if result is not None:
                job, _ = result
                job.redis_server_version = self.get_redis_server_version()
                log.debug("worker %s: took job %s", self.name, job.id)
                return result
        return None


def enqueue_at_front(queue: Queue, job: Job, pipeline: Pipeline) -> None:
    """Queue `job` again at the front, status queued, inside `pipeline` (not executed here).

    RQ's public enqueue_job WATCHes inside the given pipeline, which already holds our commands."""
    job.started_at = None
    job.ended_at = None
    job.worker_name = None
    queue._enqueue_job(job, pipeline=pipeline, at_front=True)


def end_canceled(worker: SimpleWorker, job: Job) -> None:
    """RQ status CANCELED, in the CanceledJobRegistry, as RQ's own job.cancel() leaves a job."""
    with worker.connection.pipeline() as pipe:
        job.set_status(JobStatus.CANCELED, pipeline=pipe)
        pipe.hset(job.key, "ended_at", utcformat(job.ended_at or now()))
        worker.cleanup_execution(job, pipeline=pipe)
        CanceledJobRegistry(
            job.origin, worker.connection, job_class=worker.job_class, serializer=worker.serializer
        ).add(job, pipeline=pipe)
        job.cleanup(ttl=job.get_result_ttl(worker.default_result_ttl), pipeline=pipe, remove_from_queue=False)
        pipe.execute()


# Refresh a running job only while RQ still lists its execution as started: a beat that races the
# job's end never brings back an entry RQ just removed (ZADD XX, and nothing else is touched).
# KEYS: started registry, job hash, execution hash, execution registry
# ARGV: execution composite key (job:execution), execution id, now (unix s), now (RQ text), ttl s
KEEP_JOB_ALIVE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[5])
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], 'last_heartbeat', ARGV[4])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'last_heartbeat', ARGV[3])
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('ZADD', KEYS[4], 'XX', now + ttl + 60, ARGV[2])
redis.call('EXPIRE', KEYS[4], ttl + 60)
return 1
"""


def keep_job_alive_call(job: Job, execution: object, stamp: float, ttl_s: int) -> tuple[list[str], list]:
    """KEYS and ARGV of KEEP_JOB_ALIVE for one running job and its RQ execution."""
    keys = [job.started_job_registry.key, job.key, execution.key, job.execution_registry.key]  # type: ignore[attr-defined]
    args = [execution.composite_key, execution.id, stamp, utcformat(now()), ttl_s]  # type: ignore[attr-defined]
    return keys, args
