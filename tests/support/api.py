"""Helpers for tests that talk to a real API process: shared module-scoped APIs, clients, and
worker info published the way a worker's heartbeat publishes it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import redis

from schemas.redis_keys import MODELS_ZSET, WORKERS_ZSET, model_workers_key, worker_info_key
from schemas.worker_info import WorkerInfo
from tests.support.api_process import ApiProcess
from tests.support.redis_server import RedisServer

# Far above what any test queues, unless a test is about the limit.
BIG_QUEUE = "100000"


def module_api(redis_server: RedisServer, **env: str) -> Iterator[ApiProcess]:
    """Body of a module-scoped fixture: one API process shared by a module's tests."""
    if redis_server.proc is None:
        redis_server.start()
    with ApiProcess({"REDIS_URL": redis_server.url, "SD_MAX_QUEUE_DEPTH": BIG_QUEUE, **env}) as api:
        yield api


def client_for(api: ApiProcess, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=api.url, headers=headers, timeout=10.0)


def publish_worker(
    client: redis.Redis, name: str = "gpu-0", age_s: float = 0.0, ttl_s: int = 30, **fields: object
) -> WorkerInfo:
    """Publish a WorkerInfo the way a worker's heartbeat does (info key with a TTL + zset score)."""
    heartbeat = time.time() - age_s
    values: dict[str, object] = {
        "name": name,
        "model": "test-model",
        "native_width": 768,
        "native_height": 640,
        "device": "cpu",
        "dtype": "float32",
        "max_batch_rows": 8,
        "slots": 2,
        "started_at": heartbeat - 60,
        "heartbeat_at": heartbeat,
        "heartbeat_interval_s": 2.0,
    }
    values.update(fields)
    info = WorkerInfo.model_validate(values)
    client.set(worker_info_key(name), info.model_dump_json(), ex=ttl_s)
    client.zadd(WORKERS_ZSET, {name: heartbeat})
    client.zadd(model_workers_key(info.model), {name: heartbeat})
    client.zadd(MODELS_ZSET, {info.model: heartbeat})
    return info
