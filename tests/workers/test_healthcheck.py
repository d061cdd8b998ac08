"""The container health check reads the heartbeat file the worker touches while its engine lives."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from workers.healthcheck import check, touch


def test_fresh_file_is_healthy(tmp_path: Path) -> None:
    path = tmp_path / "beat"
    touch(path)
    assert check(path, heartbeat_interval_s=2.0) is None


def test_stale_or_missing_file_is_unhealthy(tmp_path: Path) -> None:
    path = tmp_path / "beat"
    touch(path)
    problem = check(path, heartbeat_interval_s=2.0, now=time.time() + 60)
    assert problem is not None and "last heartbeat 60 s ago" in problem
    assert "no readable heartbeat file" in (check(tmp_path / "missing", 2.0) or "")


def test_a_running_worker_is_healthy(start_worker) -> None:
    start_worker(SD_SLOTS="1")
    result = subprocess.run(
        [sys.executable, "-m", "workers.healthcheck"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
