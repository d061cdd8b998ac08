"""Watch a job without blocking anything: async polls of what it is doing, with redis.asyncio.

`wait_for_job` waits for its end (one HGET per poll; the interval grows from POLL_MIN_S to POLL_MAX_S,
so many waiters stay cheap); `job_fingerprint` reads, in one round trip, everything whose change a
client would see (status, progress, place in the queue, cancel, preview), so a watcher builds the full
snapshot only when it changed. A waiting request holds no thread: the event loop serves everything
else meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

import redis.asyncio
from rq.job import Job
from rq.job import JobStatus as RqStatus

from schemas.redis_keys import cancel_key, preview_key, progress_key

POLL_MIN_S = 0.05
POLL_MAX_S = 0.5
POLL_GROWTH = 1.5

# RQ statuses after which a job changes no more (a retried job goes back to queued, never through these).
ENDED = frozenset({RqStatus.FINISHED, RqStatus.FAILED, RqStatus.STOPPED, RqStatus.CANCELED})


class WaitOutcome(StrEnum):
    ENDED = "ended"  # finished, failed, canceled, or its hash is gone (expired)
    TIMED_OUT = "timed_out"
    DISCONNECTED = "disconnected"  # the client went away: nobody will read the answer


async def wait_for_job(
    client: redis.asyncio.Redis,
    job_id: str,
    timeout_s: float,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> WaitOutcome:
    """Poll the job's status until it ended, `timeout_s` passed, or `disconnected()` says so.

    Redis errors propagate (the caller answers 503).
    """
    key = Job.key_for(job_id)
    deadline = time.monotonic() + timeout_s
    interval_s = POLL_MIN_S
    while True:
        status = await client.hget(key, "status")
        if status is None or _ended(status):
            return WaitOutcome.ENDED
        if disconnected is not None and await disconnected():
            return WaitOutcome.DISCONNECTED
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            return WaitOutcome.TIMED_OUT
        await asyncio.sleep(min(interval_s, left_s))
        interval_s = min(interval_s * POLL_GROWTH, POLL_MAX_S)


def _ended(raw: bytes | str) -> bool:
    value = raw.decode() if isinstance(raw, bytes) else raw
    try:
        return RqStatus(value) in ENDED
    except ValueError:
        return False


async def job_fingerprint(client: redis.asyncio.Redis, job_id: str, queue_key: str) -> tuple[object, ...]:
    """What changes when anything a client sees of the job changes (but the jobs ahead of a queued one
    leaving the workers' waiting lists: re-read those now and then), in one pipelined round trip.

    Redis errors propagate.
    """
    async with client.pipeline(transaction=False) as pipe:
        pipe.hmget(Job.key_for(job_id), ["status", "worker_name"])
        pipe.hmget(progress_key(job_id), ["step", "total_steps", "attempt"])
        pipe.lpos(queue_key, job_id)
        pipe.exists(cancel_key(job_id))
        pipe.exists(preview_key(job_id))
        replies = await pipe.execute()
    return tuple(tuple(reply) if isinstance(reply, list) else reply for reply in replies)
