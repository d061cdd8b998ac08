"""A worker serving an original single-file checkpoint, with and without a config folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.jobs import enqueue, params, result_of, wait_terminal
from tests.support.worker_process import ProcessError, WorkerProcess


def test_single_file_with_its_config_folder(client, redis_url: str, random_models: dict[str, Path]) -> None:
    env = {
        "REDIS_URL": redis_url,
        "SD_MODEL": str(random_models["sd2_file"]),
        "SD_MODEL_CONFIG_DIR": str(random_models["sd2"]),
    }
    with WorkerProcess(env) as worker:
        job = enqueue(client, params(steps=3)).id
        assert wait_terminal(client, [job], 120) == {job: "finished"}
        assert result_of(client, job).model == "sd2"  # the file's name
        assert "detected an SD 2 checkpoint" in worker.logs()


def test_single_file_whose_weights_do_not_fit_the_shipped_configs(
    redis_url: str, random_models: dict[str, Path]
) -> None:
    """Without SD_MODEL_CONFIG_DIR a tiny file gets SD 1.5's configs: the worker refuses to start, clearly."""
    worker = WorkerProcess({"REDIS_URL": redis_url, "SD_MODEL": str(random_models["sd1_file"])})
    with pytest.raises(ProcessError):
        worker.start(timeout_s=120)
    assert "config does not fit the weights" in worker.logs() or "do not match" in worker.logs()
    assert worker.proc.wait(timeout=30) == 2
