"""Shared fixtures: a private Redis for the whole session, flushed between tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import RedisServer


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


@pytest.fixture(scope="session")
def random_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random SD 1.x- and 2.x-style models, each as a diffusers folder and as a single file
    (keys "sd1", "sd1_file", "sd2", "sd2_file"), built once per session."""
    from models.random_model import build_random_model

    root = tmp_path_factory.mktemp("random-models")
    paths: dict[str, Path] = {}
    for variant in ("sd1", "sd2"):
        paths[variant] = build_random_model(
            variant, root / variant, seed=0, single_file=root / f"{variant}.safetensors"
        )
        paths[f"{variant}_file"] = root / f"{variant}.safetensors"
    return paths


@pytest.fixture(scope="session")
def sdxl_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random SDXL-architecture model built with diffusers' own classes, as a diffusers folder
    and as an original single file (keys "sdxl", "sdxl_file"), built once per session."""
    from tests.support.sdxl_models import build_sdxl_model

    root = tmp_path_factory.mktemp("sdxl-model")
    folder = build_sdxl_model(root / "tiny-sdxl", seed=0, single_file=root / "tiny-sdxl.safetensors")
    return {"sdxl": folder, "sdxl_file": root / "tiny-sdxl.safetensors"}
