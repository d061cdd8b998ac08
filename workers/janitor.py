"""The janitor: `python -m workers.janitor`, a small process (no torch) that finds dead workers' jobs.

Every SD_JANITOR_INTERVAL_S it runs RQ's registry cleanup on every model's queue (`txt2img:<model>`,
found in RQ's set of queues and in the models workers have published, schemas/queue.py):
- a job whose StartedJobRegistry entry expired (its worker stopped heartbeating for
  SD_JOB_HEARTBEAT_TTL_S: SIGKILL, crash, lost machine) is retried while it has retries left
  (RQ `Retry(max=...)`, set by the API), else it FAILS with job.meta["error"] =
  {"type": ErrorType.WORKER_DIED.value, ...}: never left `running`;
- dead RQ worker names leave RQ's worker registry, jobs stuck between dequeue and start (a worker
  killed in that instant) are failed or retried by RQ's intermediate-queue cleanup;
- names that stopped heartbeating for SD_WORKER_STALE_S leave WORKERS_ZSET and their model's set,
  and models not served for MODEL_FORGET_S leave MODELS_ZSET.

After Redis was unreachable it waits one SD_JOB_HEARTBEAT_TTL_S before sweeping, so live workers
refresh their jobs first and no running job is mistaken for an abandoned one.
Several janitors may run: a short lock lets one sweep at a time.

Torch-free on purpose (rq, redis, pydantic-settings, schemas/ and workers/rq_internals.py only): the
API image, which has no torch, ships these files to run it.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass

import redis
from pydantic import Field
from redis.exceptions import RedisError
from rq.job import Job
from rq.queue import Queue
from rq.registry import clean_registries
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import BaseWorker
from rq.worker_registration import clean_worker_registry

from schemas.errors import ErrorType
from schemas.queue import QUEUE_PREFIX, model_of_queue, queue_name
from schemas.redis_keys import MODEL_FORGET_S, MODELS_ZSET, PREFIX, WORKERS_ZSET, model_workers_key
from schemas.settings import (
    ConfigurationError,
    LivenessSettings,
    configure_logging,
    load_settings,
    redis_client,
)
from workers.rq_internals import AllowlistedJob

log = logging.getLogger("workers.janitor")  # not __main__ under -m

LOCK_KEY = PREFIX + "janitor:lock"


class JanitorSettings(LivenessSettings):
    """What the janitor reads beside what the worker reads too (schemas/settings.py)."""

    janitor_interval_s: float = Field(10.0, gt=0, le=3600, description="janitor: seconds between sweeps")


@dataclass
class SweepReport:
    retried: int = 0
    failed: int = 0
    pruned_workers: int = 0
    swept: bool = True  # False: another janitor held the lock


def model_queues(client: redis.Redis) -> list[Queue]:
    """Every model's queue: those in RQ's set of queues (a queue joins it with its first job) and those
    of the models workers have published, by name."""
    names = {queue.name for queue in Queue.all(connection=client) if model_of_queue(queue.name) is not None}
    names |= {queue_name(_text(model)) for model in client.zrange(MODELS_ZSET, 0, -1)}
    return [
        Queue(name, connection=client, serializer=JSONSerializer, job_class=AllowlistedJob)
        for name in sorted(names)
    ]


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def sweep(
    client: redis.Redis,
    job_heartbeat_ttl_s: int,
    worker_stale_s: float,
    intermediate_worker: BaseWorker | None = None,
) -> SweepReport:
    """One cleanup pass. `intermediate_worker`: an RQ worker object RQ's intermediate-queue cleanup can
    fail jobs through (its connection gets RQ's long socket timeout: do not share it)."""
    report = SweepReport()
    if not client.set(LOCK_KEY, b"1", nx=True, ex=60):
        report.swept = False
        return report
    try:

        def on_abandoned(job: Job, *exc_info: object) -> bool:
            if job.retries_left and job.retries_left > 0:
                report.retried += 1
                log.warning(
                    "job %s: its worker %s stopped heartbeating; retrying it (%d retries left after this one)",
                    job.id,
                    job.worker_name or "?",
                    job.retries_left - 1,
                )
            else:
                report.failed += 1
                job.meta["error"] = {
                    "type": ErrorType.WORKER_DIED.value,
                    "message": (
                        f"the worker running this job stopped heartbeating for more than {job_heartbeat_ttl_s} s "
                        "(it crashed or was killed) and the job had no retries left"
                    ),
                }
                log.warning(
                    "job %s: its worker %s stopped heartbeating; no retries left: failed",
                    job.id,
                    job.worker_name or "?",
                )
                job.ended_at = now()  # RQ's cleanup leaves it unset; its job.save() writes it
            job.save_meta()  # retried jobs are saved whole by RQ, failed ones are not
            return True

        for queue in model_queues(client):
            clean_registries(queue, exception_handlers=[on_abandoned])
            clean_worker_registry(queue)
            if intermediate_worker is not None:
                queue.intermediate_queue.cleanup(intermediate_worker, queue)
        stale_before = time.time() - worker_stale_s
        report.pruned_workers = client.zremrangebyscore(WORKERS_ZSET, "-inf", stale_before)
        for model in client.zrange(MODELS_ZSET, 0, -1):
            client.zremrangebyscore(model_workers_key(_text(model)), "-inf", stale_before)
        client.zremrangebyscore(MODELS_ZSET, "-inf", time.time() - MODEL_FORGET_S)
    finally:
        client.delete(LOCK_KEY)
    return report


class Janitor:
    def __init__(self, settings: JanitorSettings) -> None:
        self.settings = settings
        self.client = redis_client(settings)
        # RQ's intermediate-queue cleanup needs a worker object; it gets its own connection
        self._rq_worker = BaseWorker(
            [QUEUE_PREFIX],  # any queue: it only lends RQ's cleanup its failure handling
            name="sd-janitor",
            connection=redis_client(settings, socket_timeout=None),
            serializer=JSONSerializer,
            job_class=AllowlistedJob,
            prepare_for_work=False,
        )
        self._stop = threading.Event()

    def stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> None:
        settings = self.settings
        reachable_since: float | None = None
        log.info(
            "janitor: sweeping every model's queue (%s:<model>) every %g s (abandoned after %d s without "
            "heartbeat)",
            QUEUE_PREFIX,
            settings.janitor_interval_s,
            settings.job_heartbeat_ttl_s,
        )
        while not self._stop.is_set():
            try:
                self.client.ping()
                if reachable_since is None:
                    reachable_since = time.monotonic()
                    log.info("janitor: Redis reachable; first sweep in %d s", settings.job_heartbeat_ttl_s)
                if time.monotonic() - reachable_since >= settings.job_heartbeat_ttl_s:
                    report = sweep(
                        self.client, settings.job_heartbeat_ttl_s, settings.worker_stale_s, self._rq_worker
                    )
                    if report.retried or report.failed or report.pruned_workers:
                        log.info(
                            "janitor: %d abandoned job(s) retried, %d failed, %d stale worker(s) pruned",
                            report.retried,
                            report.failed,
                            report.pruned_workers,
                        )
            except RedisError as error:
                if reachable_since is not None:
                    log.warning("janitor: Redis unreachable (%s)", error)
                reachable_since = None
            self._stop.wait(settings.janitor_interval_s)
        log.info("janitor: stopped")


def main() -> int:
    try:
        settings = load_settings(JanitorSettings)
    except ConfigurationError as error:
        configure_logging("INFO")
        log.error("%s", error)
        return 2
    configure_logging(settings.log_level)
    janitor = Janitor(settings)
    signal.signal(signal.SIGTERM, janitor.stop)
    signal.signal(signal.SIGINT, janitor.stop)
    janitor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
