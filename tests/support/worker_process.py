"""Real worker and janitor processes (`python -m workers.main`, `python -m workers.janitor`) for tests
and benchmarks.

    with WorkerProcess({"REDIS_URL": url, "SD_MODEL": str(model_dir)}) as worker:
        ...  # started and ready: its slots listen on the queue
    worker.stop()  # SIGTERM: drains; returns the exit status
    worker.kill()  # SIGKILL: dies mid-batch

Each process gets the current environment plus `env`, runs from the repository root, and logs to a
temporary file (`logs()`). A worker is ready once it has published its WorkerInfo in Redis and all
of its RQ slot workers are registered on the queue.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

REPO_ROOT = Path(__file__).resolve().parents[2]

# Fast liveness for tests: a killed worker's jobs expire within a few seconds.
TEST_WORKER_ENV = {
    "SD_DEVICE": "cpu",
    "SD_TORCH_THREADS": "1",
    "SD_HEARTBEAT_INTERVAL_S": "0.5",
    "SD_JOB_HEARTBEAT_TTL_S": "4",
    "SD_LOG_LEVEL": "INFO",
}


# Loaded here, not in the forked child: between fork and exec only the C call may run.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the test process dies, so a crashed or killed test run
    leaves no worker behind, polling a Redis that is gone. (The kernel ties it to the thread that
    started the child: start processes from a thread that outlives them, e.g. the main thread.)"""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class ProcessError(RuntimeError):
    """The process did not come up; the message holds the end of its log."""


class _ManagedProcess:
    module = ""

    def __init__(self, env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.env = {**TEST_WORKER_ENV, **(env or {})}
        self.proc: subprocess.Popen | None = None
        if log_path is not None:  # a file the caller keeps (e.g. a GPU bench's output folder)
            self._log = open(log_path, "wb")  # noqa: SIM115
        else:
            self._log = tempfile.NamedTemporaryFile(prefix=f"sd-{self.module}-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self) -> None:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

    def logs(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessError(
                f"{self.module} exited with code {self.proc.returncode}:\n{self.logs()[-4000:]}"
            )

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; SIGKILL if it hangs. Returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self):
        """`with WorkerProcess(env) as w:` and `with WorkerProcess(env).start() as w:` both start it once."""
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0):
        raise NotImplementedError


class WorkerProcess(_ManagedProcess):
    module = "workers.main"

    def __init__(self, env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        super().__init__(env, log_path)
        self.env.setdefault("SD_WORKER_NAME", f"test-worker-{uuid.uuid4().hex[:8]}")
        self.model = ""  # the model it serves, once ready (its WorkerInfo)

    @property
    def name(self) -> str:
        return self.env["SD_WORKER_NAME"]

    def start(self, timeout_s: float = 120.0) -> WorkerProcess:
        """Start and wait until ready (ProcessError if it exits or does not get ready in time)."""
        self.launch()
        return self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 120.0) -> WorkerProcess:
        """Wait until a launched worker is ready (several can load their models at once: launch each,
        then wait for each)."""
        client = redis.Redis.from_url(self.env.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                self._check_alive()
                if self._ready(client):
                    return self
                time.sleep(0.1)
        finally:
            client.close()
        self.kill()
        raise ProcessError(f"worker not ready within {timeout_s} s:\n{self.logs()[-4000:]}")

    def _ready(self, client: redis.Redis) -> bool:
        from schemas.queue import queue_name
        from schemas.redis_keys import worker_info_key
        from schemas.worker_info import WorkerInfo

        try:
            info = client.get(worker_info_key(self.name))
            if info is None:
                return False
            self.model = WorkerInfo.model_validate_json(info).model
            slots = int(self.env.get("SD_SLOTS", "0")) or 1
            prefix = f"rq:worker:{self.name}.slot".encode()
            workers_key = f"rq:workers:{queue_name(self.model)}"
            registered = [k for k in client.smembers(workers_key) if k.startswith(prefix)]
            return len(registered) >= slots
        except redis.RedisError:
            return False


class JanitorProcess(_ManagedProcess):
    module = "workers.janitor"

    def start(self, timeout_s: float = 60.0) -> JanitorProcess:
        self.launch()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if "janitor: sweeping" in self.logs():
                return self
            time.sleep(0.1)
        self.kill()
        raise ProcessError(f"janitor did not start within {timeout_s} s:\n{self.logs()[-4000:]}")
