"""Slot threads stop quickly: RQ's command channel (a pubsub thread polled every 60 s, joined
without a timeout) made about 4 stops in 10 take 30 s; each must now take at most 5 s when idle."""

from __future__ import annotations

import time

import redis

from schemas.queue import queue_name
from tests.support.jobs import wait_until
from workers.slots import SlotPool

STOP_BOUND_S = 5.0
MODEL = "stop-test"


def registered(client: redis.Redis, name: str) -> int:
    prefix = f"rq:worker:{name}.slot".encode()
    return sum(key.startswith(prefix) for key in client.smembers(f"rq:workers:{queue_name(MODEL)}"))


def test_twenty_idle_stops_in_a_row_each_within_five_seconds(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    durations = []
    for attempt in range(20):
        pool = SlotPool(
            2,
            f"stop-test-{attempt}",
            queue_name(MODEL),
            connect=lambda: redis.Redis.from_url(redis_url, socket_timeout=2),
            job_heartbeat_ttl_s=30,
            result_ttl_s=60,
        )
        pool.start()
        wait_until(lambda a=attempt: registered(client, f"stop-test-{a}") == 2, 30, "both slots to listen")
        started = time.monotonic()
        pool.stop_dequeuing()
        assert pool.join(STOP_BOUND_S + 5), f"stop {attempt} hung"
        durations.append(time.monotonic() - started)
    client.close()
    assert max(durations) <= STOP_BOUND_S, durations
