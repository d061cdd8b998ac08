"""The launcher (`python -m workers.launcher`): one worker process per device, each with its own device
and name; crashes restarted with backoff; exit status 2 passed through; signals forwarded every time;
and the container's health check healthy only while every worker beats.

The process tests run the launcher in a subprocess (signals as in a container) with fake children: a
small script that records its device, name and the signals it gets, and exits as told per device.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from schemas.redis_keys import WORKERS_ZSET
from schemas.settings import ConfigurationError, load_settings
from workers.healthcheck import EXPECTED_NAME, check_all, heartbeat_file, touch, write_expected
from workers.launcher import Backoff, Launcher, LauncherSettings, parse_device_list, resolve_devices

ROOT = Path(__file__).resolve().parents[2]

FAKE_CHILD = """
import os, signal, sys, time
from pathlib import Path

out = Path(os.environ["FAKE_OUT"])
tag = os.environ["SD_DEVICE"].replace(":", "")
(out / f"start-{tag}-{os.getpid()}").write_text(os.environ["SD_DEVICE"] + " " + os.environ["SD_WORKER_NAME"])
exit_at_once = os.environ.get("FAKE_EXIT_" + tag.upper())
if exit_at_once is not None:
    sys.exit(int(exit_at_once))
got = []

def on_signal(signum, frame):
    got.append(signum)
    with open(out / f"signals-{tag}", "a") as file:
        file.write(signal.Signals(signum).name + "\\n")

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
while len(got) < int(os.environ.get("FAKE_SIGNALS_TO_EXIT", "1")):
    time.sleep(0.01)
sys.exit(int(os.environ.get("FAKE_EXIT_ON_STOP", "0")))
"""

DRIVER = """
import logging, sys
from pathlib import Path
from workers.launcher import Backoff, Launcher

logging.basicConfig(level=logging.INFO, format="%(message)s")
devices, command, heartbeats = sys.argv[1].split(","), sys.argv[2:-1], Path(sys.argv[-1])
backoff = Backoff(initial_s=0.1, max_s=0.4, reset_after_s=60)
sys.exit(Launcher(devices, "box", command, heartbeats, backoff, poll_s=0.02).run())
"""


class LauncherRun:
    def __init__(self, tmp_path: Path, devices: str, command: list[str], env: dict[str, str]) -> None:
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.heartbeats = tmp_path / "heartbeats"
        self.log = tmp_path / "launcher.log"
        full_env = {**os.environ, **env, "FAKE_OUT": str(self.out), "PYTHONPATH": str(ROOT)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", DRIVER, devices, *command, str(self.heartbeats)],
                cwd=ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def starts(self, tag: str | None = None) -> list[str]:
        return [p.read_text() for p in sorted(self.out.glob(f"start-{tag or ''}*"))]

    def signals(self, tag: str) -> list[str]:
        path = self.out / f"signals-{tag}"
        return path.read_text().split() if path.exists() else []

    def logs(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; launcher log:\n{self.logs()}")
            time.sleep(0.02)

    def wait_exit(self, timeout_s: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the launcher did not exit; its log:\n{self.logs()}") from None


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., LauncherRun]]:
    """launch(devices, **env) -> a launcher with fake children; killed at the end if still running."""
    runs: list[LauncherRun] = []
    fake = tmp_path / "fake_child.py"
    fake.write_text(FAKE_CHILD)

    def start(devices: str, **env: str) -> LauncherRun:
        run = LauncherRun(tmp_path, devices, [sys.executable, str(fake)], env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
            run.proc.send_signal(signal.SIGTERM)
            run.proc.wait(10)


# --- which devices ------------------------------------------------------------------------------


def test_all_means_every_visible_cuda_device_or_one_cpu_worker() -> None:
    assert resolve_devices("all", lambda: 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert resolve_devices("all", lambda: 0) == ["cpu"]


def test_a_device_list_names_distinct_devices() -> None:
    assert parse_device_list("0, 1,cuda:3") == ["cuda:0", "cuda:1", "cuda:3"]
    assert resolve_devices("cuda:0,cuda:1,cuda:3", lambda: 4) == ["cuda:0", "cuda:1", "cuda:3"]
    assert resolve_devices("cpu", lambda: pytest.fail("a CPU worker needs no device count")) == ["cpu"]
    for text in ("1,cuda:1", "cpu,cpu"):
        with pytest.raises(ValueError, match="more than once"):
            parse_device_list(text)
    with pytest.raises(ValueError, match="comma list"):
        parse_device_list("gpu0")


def test_bad_device_settings_name_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="SD_DEVICES: .*more than once"):
        load_settings(LauncherSettings, devices="0,0")
    assert load_settings(LauncherSettings, devices=" 0,1 ").devices == "cuda:0,cuda:1"
    assert load_settings(LauncherSettings).devices == "all"
    with pytest.raises(ConfigurationError, match="SD_DEVICES: no CUDA device 2: this machine shows 2"):
        resolve_devices("cuda:0,cuda:2", lambda: 2)
    with pytest.raises(ConfigurationError, match="shows none"):
        resolve_devices("cuda:0", lambda: 0)


def test_names_are_distinct_per_device() -> None:
    launcher = Launcher(["cuda:0", "cuda:1", "cpu"], "gpu-box", command=["true"])
    assert [c.name for c in launcher.children] == ["gpu-box-cuda0", "gpu-box-cuda1", "gpu-box-cpu"]


def test_backoff_doubles_to_its_cap_and_resets_after_a_long_run() -> None:
    backoff = Backoff()  # the launcher's own: 1 s doubling to 60 s, reset after 10 minutes
    delays, delay = [], 0.0
    for _ in range(8):
        delay = backoff.next_delay(delay, ran_s=5.0)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.next_delay(60, ran_s=600.0) == 1


# --- the launcher with fake children ------------------------------------------------------------


def test_each_child_gets_its_own_device_name_and_heartbeat_file(launch) -> None:
    run = launch("cuda:0,cuda:1,cpu")
    run.wait_for(lambda: len(run.starts()) == 3)
    started = sorted(run.starts())
    assert started == ["cpu box-cpu", "cuda:0 box-cuda0", "cuda:1 box-cuda1"]
    expected = (run.heartbeats / EXPECTED_NAME).read_text().split()
    assert expected == ["cuda-0.heartbeat", "cuda-1.heartbeat", "cpu.heartbeat"]
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0
    assert not (run.heartbeats / EXPECTED_NAME).exists()  # a later lone worker is judged alone


def test_a_crashing_child_is_restarted_with_backoff_and_the_others_keep_running(launch) -> None:
    run = launch("cuda:0,cuda:1", FAKE_EXIT_CUDA1="1")
    run.wait_for(lambda: len(run.starts("cuda1")) >= 5)
    delays = re.findall(r"worker on cuda:1 exited with status 1; restarting in ([\d.]+) s", run.logs())
    assert [float(d) for d in delays[:4]] == [0.1, 0.2, 0.4, 0.4]
    assert len(run.starts("cuda0")) == 1 and run.proc.poll() is None
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() in (0, 1)  # 1 when the stop caught the crashing child running
    assert "restarting" not in run.logs().split("SIGTERM: stopping the workers")[1]  # none once stopping
    assert run.signals("cuda0") == ["SIGTERM"]


def test_exit_status_2_stops_the_others_and_is_the_launchers(launch) -> None:
    run = launch("cuda:0,cuda:1", FAKE_EXIT_CUDA1="2")
    assert run.wait_exit() == 2
    assert len(run.starts("cuda1")) == 1  # never restarted: a restart cannot fix a bad configuration
    assert run.signals("cuda0") == ["SIGTERM"]  # the others drain
    assert "restart cannot fix" in run.logs()


def test_every_signal_is_forwarded_to_every_child(launch) -> None:
    run = launch("cuda:0,cuda:1", FAKE_SIGNALS_TO_EXIT="2")
    run.wait_for(lambda: len(run.starts()) == 2)
    run.proc.send_signal(signal.SIGTERM)  # drain
    run.wait_for(lambda: run.signals("cuda0") and run.signals("cuda1"))
    time.sleep(0.2)
    assert run.proc.poll() is None  # still draining
    run.proc.send_signal(signal.SIGINT)  # a second signal: the workers hand their jobs back now
    assert run.wait_exit() == 0
    assert run.signals("cuda0") == run.signals("cuda1") == ["SIGTERM", "SIGINT"]


def test_a_child_failing_its_stop_makes_the_exit_status_1_without_a_restart(launch) -> None:
    run = launch("cpu", FAKE_EXIT_ON_STOP="1")
    run.wait_for(lambda: len(run.starts()) == 1)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 1
    assert len(run.starts()) == 1 and "restarting" not in run.logs()


# --- the health check of a container of workers -------------------------------------------------


def test_healthy_only_while_every_listed_worker_beats(tmp_path: Path) -> None:
    files = [heartbeat_file(device, tmp_path) for device in ("cuda:0", "cuda:1")]
    touch(tmp_path / "cpu.heartbeat")  # an old worker's file: removed, it cannot stand in for one
    write_expected(files, tmp_path)
    assert not (tmp_path / "cpu.heartbeat").exists()
    problems = check_all(2.0, tmp_path)
    assert len(problems) == 2 and all("no readable heartbeat file" in p for p in problems)
    touch(files[0])
    (problem,) = check_all(2.0, tmp_path)
    assert problem.startswith(f"cuda-1.heartbeat: no readable heartbeat file at {files[1]}")
    touch(files[1])
    assert check_all(2.0, tmp_path) == []
    stale = check_all(2.0, tmp_path, now=time.time() + 60)
    assert len(stale) == 2 and "cuda-0.heartbeat: last heartbeat 60 s ago" in stale[0]


def test_a_worker_without_the_launcher_is_judged_by_the_newest_file(tmp_path: Path) -> None:
    assert "no heartbeat file" in check_all(2.0, tmp_path)[0]
    old = heartbeat_file("auto", tmp_path)
    touch(old)
    os.utime(old, (time.time() - 100, time.time() - 100))
    touch(heartbeat_file("cpu", tmp_path))
    assert check_all(2.0, tmp_path) == []


# --- the launcher with real workers ---------------------------------------------------------------


# the real child command (python -m workers.main), its manifest in a private folder
REAL_DRIVER = """
import logging, sys
from pathlib import Path
from workers.launcher import Launcher

logging.basicConfig(level=logging.INFO)
sys.exit(Launcher(["cpu"], "launcher-test", heartbeat_dir=Path(sys.argv[1])).run())
"""


def test_the_launcher_runs_real_workers_under_their_device_names(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path
) -> None:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SD_MODEL": str(tiny_model_dir),
        "SD_TORCH_THREADS": "1",
        "SD_HEARTBEAT_INTERVAL_S": "0.5",
        "SD_JOB_HEARTBEAT_TTL_S": "4",
        "PYTHONPATH": str(ROOT),
    }
    log_path = tmp_path / "launcher.log"
    client = redis.Redis.from_url(redis_url)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", REAL_DRIVER, str(tmp_path / "heartbeats")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while client.zscore(WORKERS_ZSET, "launcher-test-cpu") is None:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
        assert client.zscore(WORKERS_ZSET, "launcher-test-cpu") is None  # it said goodbye
    finally:
        if proc.poll() is None:
            proc.kill()
        client.close()
