"""A real API process (`python -m uvicorn service.app:app`) on a free port, for tests and benchmarks.

    with ApiProcess({"REDIS_URL": redis_url, "SD_API_KEYS": "k1"}) as api:
        httpx.get(api.url + "/healthz")

The process gets the current environment plus `env`, runs from the repository root, logs to a
temporary file (read it with `api.logs()`), and is stopped with SIGTERM (SIGKILL if it hangs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


class ApiProcessError(RuntimeError):
    """The API did not come up; the message holds the end of its log."""


class ApiProcess:
    def __init__(
        self,
        env: dict[str, str] | None = None,
        port: int | None = None,
        app: str = "service.app:app",
        log_level: str = "warning",
        access_log: bool = False,
    ) -> None:
        self.env = dict(env or {})
        self.port = port or free_port()
        self.app = app
        self.log_level = log_level
        self.access_log = access_log
        self.proc: subprocess.Popen | None = None
        self._log_file = tempfile.NamedTemporaryFile(prefix="sd-api-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--log-level", self.log_level]
        if not self.access_log:
            cmd.append("--no-access-log")
        return cmd

    def start(self, timeout_s: float = 30.0) -> ApiProcess:
        """Start the process and wait until /healthz answers 200 (ApiProcessError if it exits or hangs)."""
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            self.command(), cwd=REPO_ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ApiProcessError(f"API process exited with code {code}:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise ApiProcessError(f"API did not answer /healthz within {timeout_s} s:\n{self.logs()[-4000:]}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def logs(self) -> str:
        return Path(self._log_file.name).read_text(errors="replace")

    def cleanup(self) -> None:
        self.stop()
        self._log_file.close()
        Path(self._log_file.name).unlink(missing_ok=True)

    def __enter__(self) -> ApiProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
