"""Shared fixtures: a private Redis for the whole session, flushed between tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.helpers.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of the private Redis, emptied before each test that uses it."""
    if redis_server.proc is None:  # a test may have stopped it
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url
