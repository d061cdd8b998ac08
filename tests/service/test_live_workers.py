"""Which published WorkerInfo documents count as live workers."""

from __future__ import annotations

import time

from schemas.redis_keys import WORKERS_ZSET, worker_info_key
from schemas.worker_info import WorkerInfo
from service.live_workers import live_workers_sync, parse_live
from tests.support.api import publish_worker


def info(name: str, heartbeat_at: float) -> bytes:
    return WorkerInfo(
        name=name, model="m", native_width=512, native_height=512, device="cpu", dtype="float32",
        max_batch_rows=4, slots=1, started_at=0, heartbeat_at=heartbeat_at, heartbeat_interval_s=2,
    ).model_dump_json().encode()  # fmt: skip


def test_parse_live_orders_newest_first_and_drops_stale_missing_and_malformed() -> None:
    now = 1000.0
    live = parse_live([info("a", 990), None, b"{broken", info("b", 999), info("old", 900)], now, stale_s=30)
    assert [w.name for w in live] == ["b", "a"]


def test_expired_info_key_means_dead(rdb) -> None:
    publish_worker(rdb, name="gone")
    rdb.delete(worker_info_key("gone"))  # the TTL ran out; the zset entry is still there
    publish_worker(rdb, name="here")
    assert [w.name for w in live_workers_sync(rdb, stale_s=30)] == ["here"]


def test_old_heartbeat_inside_a_fresh_key_means_dead(rdb) -> None:
    publish_worker(rdb, name="stuck")
    rdb.zadd(WORKERS_ZSET, {"stuck": time.time()})  # score fresh, but the info says otherwise
    rdb.set(worker_info_key("stuck"), info("stuck", time.time() - 120), ex=30)
    assert live_workers_sync(rdb, stale_s=30) == []
