"""Wait for a job to end without blocking anything: an async poll of its RQ status with redis.asyncio.

A waiting request holds no thread (the event loop serves everything else meanwhile) and costs one
HGET per poll; the interval grows from POLL_MIN_S to POLL_MAX_S, so many waiters stay cheap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

import redis.asyncio
from rq.job import Job
from rq.job import JobStatus as RqStatus

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
