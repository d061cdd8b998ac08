"""Progress out and cancel flags in, for every job of the batch, in ONE pipelined Redis round trip.

The API reads progress_key(id) (hash: step, total_steps) and sets cancel_key(id) to stop a running job.
Live previews (workers/previews.py), when some job asked for one, ride along: preview_key(id), a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis

from schemas.redis_keys import cancel_key, preview_key, progress_key
from workers.previews import PREVIEW_TTL_S


class RedisProgress:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = (
            ttl_s  # progress outlives the job a while: a failed or canceled job shows where it stopped
        )

    def sync(
        self, progress: Mapping[str, tuple[int, int]], previews: Mapping[str, bytes] | None = None
    ) -> set[str]:
        if not progress:
            return set()
        job_ids = list(progress)
        with self.client.pipeline(transaction=False) as pipe:
            for job_id, (step, total_steps) in progress.items():
                pipe.hset(progress_key(job_id), mapping={"step": step, "total_steps": total_steps})
                pipe.expire(progress_key(job_id), self.ttl_s)
            for job_id, png in (previews or {}).items():
                pipe.set(preview_key(job_id), png, ex=PREVIEW_TTL_S)
            pipe.mget([cancel_key(job_id) for job_id in job_ids])
            flags = pipe.execute()[-1]
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag is not None}
