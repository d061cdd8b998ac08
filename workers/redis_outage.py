"""Riding out a Redis outage: one log line when it starts, one when it ends, and calls that wait.

While Redis is away the engine keeps denoising; finished results wait in the worker's memory and
the slots' RQ bookkeeping waits, and both go through once Redis answers again, so an outage costs
time, not a job's retries. Every thread of the process reports to the one `OUTAGE` log, so an
outage is two lines, not a traceback per thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from redis.exceptions import (
    BusyLoadingError,
    ExecAbortError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Replies of a Redis that is up but cannot take writes now: full (maxmemory with noeviction), a
# replica, still loading its data set, or a primary lost by its replica (redis-py raises its own
# classes for most, the reply text for the others).
_UNAVAILABLE_REPLIES = ("OOM", "READONLY", "LOADING", "MASTERDOWN", "EXECABORT")
RETRY_WAITS_S = (0.5, 5.0)  # first and longest wait between attempts


def unavailable(error: BaseException) -> bool:
    """Whether `error` says Redis is away or refuses writes for now (worth waiting for)."""
    if isinstance(error, RedisConnectionError | RedisTimeoutError | OutOfMemoryError | ReadOnlyError):
        return True
    if isinstance(error, BusyLoadingError | ExecAbortError):
        return True
    return isinstance(error, ResponseError) and str(error).startswith(_UNAVAILABLE_REPLIES)


class OutageLog:
    """The process's view of Redis: down since when, logged once each way."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        log.warning(
            "Redis unreachable or refusing writes (%s): denoising goes on; progress, results and job "
            "bookkeeping wait until it answers again",
            error,
        )

    def answered(self) -> None:
        if self._down_since is None:  # the common case: no lock
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info("Redis answers again after %.1f s", time.monotonic() - since)


OUTAGE = OutageLog()


class GaveUp(RedisError):
    """Redis stayed unavailable longer than the caller would wait (or the caller stopped waiting)."""


def retry_while_unavailable(
    call: Callable[[], T], limit_s: float, keep_waiting: Callable[[], bool] = lambda: True
) -> T:
    """`call()`, again and again while Redis is unavailable, for at most `limit_s` seconds and while
    `keep_waiting()`; GaveUp then. Other errors propagate at once."""
    started = time.monotonic()
    wait_s = RETRY_WAITS_S[0]
    while True:
        try:
            result = call()
        except RedisError as error:
            if not unavailable(error):
                raise
            OUTAGE.failed(error)
            if time.monotonic() - started + wait_s > limit_s or not keep_waiting():
                raise GaveUp(f"Redis unavailable for {time.monotonic() - started:.0f} s: {error}") from error
            time.sleep(wait_s)
            wait_s = min(wait_s * 2, RETRY_WAITS_S[1])
            continue
        OUTAGE.answered()
        return result
