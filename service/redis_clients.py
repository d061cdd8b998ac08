"""The two Redis clients of one app: sync (RQ, thread-pool routes) and asyncio (operational routes).

Both use short socket timeouts and a single immediate retry: a dead Redis fails in about a
second (the routes answer 503), and the first command after Redis comes back replaces the
pooled connection that died with it, so the app recovers without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.settings import Settings

# One retry: enough to swap a stale pooled connection for a fresh one after a Redis restart.
RETRIES = 1


@dataclass
class RedisClients:
    sync: redis.Redis
    aio: redis.asyncio.Redis

    async def close(self) -> None:
        await self.aio.aclose()
        self.sync.close()


def connect(settings: Settings) -> RedisClients:
    """Build both clients; nothing is connected until the first command."""
    # RQ needs bytes (decode_responses=False), and so do the PNGs.
    options = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "max_connections": settings.redis_max_connections,
        "decode_responses": False,
    }
    sync = redis.Redis.from_url(
        settings.redis_url, retry=Retry(NoBackoff(), RETRIES), client_name="sd-api", **options
    )
    aio = redis.asyncio.Redis.from_url(
        settings.redis_url,
        retry=AsyncRetry(NoBackoff(), RETRIES),
        client_name="sd-api-async",
        **options,
    )
    return RedisClients(sync=sync, aio=aio)
