"""Which GPU workers are alive, from what they publish in Redis (schemas.worker_info.WorkerInfo).

A worker is alive when its name scores a recent heartbeat in WORKERS_ZSET, its info key has not
expired, and the heartbeat inside that info is at most `stale_s` seconds old.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis
import redis.asyncio
from pydantic import ValidationError

from schemas.redis_keys import MODEL_FORGET_S, MODELS_ZSET, WORKERS_ZSET, worker_info_key
from schemas.worker_info import WorkerInfo

log = logging.getLogger(__name__)

# Enough to find a live one among recently restarted workers; the zset is pruned by the workers' side.
MAX_WORKERS_READ = 64


def _decode(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


def parse_live(raw_infos: Sequence[bytes | None], now_s: float, stale_s: float) -> list[WorkerInfo]:
    """Valid, fresh WorkerInfo documents, newest heartbeat first; a malformed one is logged and skipped."""
    live = []
    for raw in raw_infos:
        if raw is None:  # info key expired: the worker stopped heartbeating
            continue
        try:
            info = WorkerInfo.model_validate_json(raw)
        except ValidationError as error:
            log.warning("ignoring malformed worker info: %s", error.errors(include_input=False)[:3])
            continue
        if now_s - info.heartbeat_at <= stale_s:
            live.append(info)
    live.sort(key=lambda info: info.heartbeat_at, reverse=True)
    return live


def live_workers_sync(client: redis.Redis, stale_s: float) -> list[WorkerInfo]:
    now_s = time.time()
    names = client.zrevrangebyscore(WORKERS_ZSET, "+inf", now_s - stale_s, start=0, num=MAX_WORKERS_READ)
    if not names:
        return []
    return parse_live(client.mget([worker_info_key(_decode(n)) for n in names]), now_s, stale_s)


async def live_workers(client: redis.asyncio.Redis, stale_s: float) -> list[WorkerInfo]:
    now_s = time.time()
    names = await client.zrevrangebyscore(
        WORKERS_ZSET, "+inf", now_s - stale_s, start=0, num=MAX_WORKERS_READ
    )
    if not names:
        return []
    return parse_live(await client.mget([worker_info_key(_decode(n)) for n in names]), now_s, stale_s)


async def known_models(client: redis.asyncio.Redis) -> list[str]:
    """The models a worker has served in the last MODEL_FORGET_S (live or not), by name."""
    names = await client.zrangebyscore(MODELS_ZSET, time.time() - MODEL_FORGET_S, "+inf")
    return sorted(_decode(name) for name in names)
