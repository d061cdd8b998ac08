"""Fixtures for the API tests: real API processes on the session's private Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from tests.support.api import BIG_QUEUE
from tests.support.api_process import ApiProcess

# Far above what any test queues, unless a test is about the limit.


@pytest.fixture
def start_api(redis_url: str) -> Iterator[Callable[..., ApiProcess]]:
    """Start real API processes on the test's Redis (`start_api(SD_API_KEYS="k")`); all stop after the test."""
    started: list[ApiProcess] = []

    def start(**env: str) -> ApiProcess:
        api = ApiProcess({"REDIS_URL": redis_url, "SD_MAX_QUEUE_DEPTH": BIG_QUEUE, **env})
        started.append(api)
        return api.start()

    yield start
    for api in started:
        api.cleanup()


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
