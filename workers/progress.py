"""Progress out and cancel flags in, for every job of the engine, in ONE pipelined Redis round trip.

- progress_key(id): hash {step, total_steps, attempt} of a job that has taken its first step (the
  API reports it `running` from then on, for the attempt named);
- waiting_key(worker): the jobs this worker holds that have not taken their first step, scored by
  when they were enqueued (the API counts them in a queued job's position);
- preview_key(id): a live preview PNG, when the job asked for one (workers/previews.py);
- cancel_key(id): set by the API to stop a job; read back for every job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import redis

from schemas.redis_keys import cancel_key, preview_key, progress_key, waiting_key
from workers.engine import Progress
from workers.previews import PREVIEW_TTL_S

# The waiting list is rewritten at every engine iteration; if the worker dies it expires soon.
WAITING_TTL_S = 30


class RedisProgress:
    def __init__(self, client: redis.Redis, ttl_s: int, worker_name: str) -> None:
        self.client = client
        # progress outlives the job a while: a failed or canceled job shows where it stopped
        self.ttl_s = ttl_s
        self.waiting_key = waiting_key(worker_name)

    def sync(
        self,
        running: Mapping[str, Progress],
        waiting: Sequence[tuple[str, float]],
        previews: Mapping[str, bytes],
    ) -> set[str]:
        job_ids = [*running, *(job_id for job_id, _ in waiting)]
        with self.client.pipeline(transaction=False) as pipe:
            for job_id, progress in running.items():
                fields = {
                    "step": progress.step,
                    "total_steps": progress.total_steps,
                    "attempt": progress.attempt,
                }
                pipe.hset(progress_key(job_id), mapping=fields)
                pipe.expire(progress_key(job_id), self.ttl_s)
            pipe.delete(self.waiting_key)
            if waiting:
                pipe.zadd(self.waiting_key, {job_id: score for job_id, score in waiting})
                pipe.expire(self.waiting_key, WAITING_TTL_S)
            for job_id, png in previews.items():
                pipe.set(preview_key(job_id), png, ex=PREVIEW_TTL_S)
            pipe.mget([cancel_key(job_id) for job_id in job_ids])
            flags = pipe.execute()[-1]
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag is not None}
