"""The worker's pulse, every SD_HEARTBEAT_INTERVAL_S, in one pipelined round trip:

- SET worker_info_key(name) = WorkerInfo JSON (model, sizes, limits, engine counters), TTL of a few
  beats, and ZADD WORKERS_ZSET name -> now: what the API serves defaults, /readyz and /metrics from;
- ZADD model_workers_key(model) name -> now (whose waiting jobs a queued job of the model waits
  behind) and MODELS_ZSET model -> now (the model stays known while its workers restart);
- touch the health file (workers/healthcheck.py) while the engine thread lives;
- keep every running job alive in RQ: its StartedJobRegistry entry, execution and job hash, and its
  slot's worker key. RQ's SimpleWorker refreshes none of them during a job (only the forking
  Worker's parent does), so without this a long job would look abandoned to the janitor, and with
  the short TTL it is what lets a SIGKILLed worker's jobs expire quickly.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.exceptions import RedisError

from schemas.redis_keys import MODELS_ZSET, WORKERS_ZSET, model_workers_key, worker_info_key
from schemas.worker_info import EngineStats, WorkerInfo
from workers.healthcheck import touch
from workers.redis_outage import OUTAGE
from workers.rq_internals import KEEP_JOB_ALIVE, keep_job_alive_call
from workers.slots import SlotPool

log = logging.getLogger(__name__)

INFO_TTL_BEATS = 5  # the info key outlives this many missed beats


class Heartbeat:
    def __init__(
        self,
        client: redis.Redis,
        info: WorkerInfo,
        stats: Callable[[], EngineStats],
        slots: SlotPool,
        job_heartbeat_ttl_s: int,
        engine_alive: Callable[[], bool] = lambda: True,
        health_file: Path | None = None,
    ) -> None:
        self.client = client
        self.info = info
        self._stats = stats
        self._slots = slots
        self._job_ttl_s = job_heartbeat_ttl_s
        self._engine_alive = engine_alive
        self._health_file = health_file  # touched on each beat while the engine lives (container health)
        self._keep_alive = client.register_script(KEEP_JOB_ALIVE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.beat_safely()  # published before the first job is taken
        self._thread = threading.Thread(target=self._run, name="sd-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and say goodbye: the API stops counting this worker at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(WORKERS_ZSET, self.info.name)
                pipe.zrem(model_workers_key(self.info.model), self.info.name)
                pipe.delete(worker_info_key(self.info.name))
                pipe.execute()
        except RedisError as error:
            log.warning(
                "could not unregister worker %s (%s); its entry expires by itself", self.info.name, error
            )

    def _run(self) -> None:
        while not self._stop.wait(self.info.heartbeat_interval_s):
            self.beat_safely()

    def beat_safely(self) -> None:
        if self._health_file is not None and self._engine_alive():
            try:
                touch(self._health_file)
            except OSError as error:
                log.warning("cannot write the health file %s: %s", self._health_file, error)
        try:
            self.beat()
        except RedisError as error:
            OUTAGE.failed(error)  # one line per outage for the whole process
            return
        OUTAGE.answered()

    def beat(self) -> None:
        stamp = time.time()
        info = self.info.model_copy(update={"heartbeat_at": stamp, "stats": self._stats()})
        info_ttl_s = max(2, math.ceil(INFO_TTL_BEATS * info.heartbeat_interval_s))
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(worker_info_key(info.name), info.model_dump_json(), ex=info_ttl_s)
            pipe.zadd(WORKERS_ZSET, {info.name: stamp})
            pipe.zadd(model_workers_key(info.model), {info.name: stamp})
            pipe.zadd(MODELS_ZSET, {info.model: stamp})
            for worker in self._slots.busy():
                running = worker.running
                if running is None:
                    continue
                job, execution = running
                if execution is None:
                    continue
                worker.heartbeat(pipeline=pipe)
                keys, args = keep_job_alive_call(job, execution, stamp, self._job_ttl_s)
                self._keep_alive(keys=keys, args=args, client=pipe)
            pipe.execute()
