"""Fixtures for the worker tests: the tiny random model (built once), real worker processes, and
RQ jobs enqueued exactly as the API enqueues them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.worker_process import JanitorProcess, WorkerProcess


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Alone-runs in the test process on one thread, as the test workers run: on a small shared machine
    torch's thread pool, oversubscribed, makes the tiny model 10-20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.random_model import build_random_model

    return build_random_model("sd1", tmp_path_factory.mktemp("worker-model") / "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    """The same model loaded in the test process, for alone-runs to compare against."""
    from models.loading import load_model

    return load_model(tiny_model_dir)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def start_worker(redis_url: str, tiny_model_dir: Path) -> Iterator:
    """start_worker(**env) -> a ready WorkerProcess on the private Redis; all are stopped at the end."""
    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        worker = WorkerProcess({"REDIS_URL": redis_url, "SD_MODEL": str(tiny_model_dir), **env})
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def start_janitor(redis_url: str) -> Iterator:
    started: list[JanitorProcess] = []

    def start(**env: str) -> JanitorProcess:
        janitor = JanitorProcess({"REDIS_URL": redis_url, **env})
        started.append(janitor)
        return janitor.start()

    yield start
    for janitor in started:
        janitor.kill()
