"""`make run`: the whole service on this machine, in one command, with no Docker.

Starts a private redis-server (unless REDIS_URL is set), the API (uvicorn, on PORT, default 8000),
one worker and the janitor; waits until /readyz answers; prints the URL and a curl example; and on
Ctrl-C or SIGTERM stops everything it started (children also die with it if it is killed).
Uses only the standard library, so it can explain a missing dependency before importing any.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = float(os.environ.get("SD_RUN_READY_TIMEOUT_S", "300"))
# The worker drains on SIGTERM (running jobs finish within SD_DRAIN_TIMEOUT_S) before it exits.
STOP_TIMEOUT_S = float(os.environ.get("SD_DRAIN_TIMEOUT_S", "60")) + 40.0


def service_commands(host: str, port: str) -> dict[str, list[str]]:
    """What each process runs, as `python -m ...` arguments (docker-compose.yml runs the same)."""
    return {
        "api": ["uvicorn", "service.app:app", "--host", host, "--port", port],
        "worker": ["workers.main"],
        "janitor": ["workers.janitor"],
    }


def say(message: str) -> None:
    print(f"[make run] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if this launcher dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Launcher:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.stopping = False
        self.redis_dir: str | None = None

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        # own session: Ctrl-C reaches only this launcher, which stops the children in order
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.children.append((name, proc))
        say(f"started {name} (pid {proc.pid})")
        return proc

    def start_redis(self, env: dict[str, str]) -> str:
        if shutil.which("redis-server") is None:
            say(
                "redis-server is not installed and REDIS_URL is not set. Install Redis 7 "
                "(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) "
                "or set REDIS_URL=redis://HOST:6379/0 to use a running server."
            )
            sys.exit(1)
        port = free_port()
        self.redis_dir = tempfile.mkdtemp(prefix="sdserve-redis-")
        argv = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        argv += ["--dir", self.redis_dir, "--maxmemory-policy", "noeviction"]
        self.spawn("redis", argv, env)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                say(f"private redis-server on port {port}")
                return f"redis://127.0.0.1:{port}/0"
            except OSError:
                time.sleep(0.1)
        self.fail("redis-server did not start")
        return ""  # unreachable

    def check_children(self) -> None:
        for name, proc in self.children:
            if proc.poll() is not None and not self.stopping:
                self.fail(f"{name} exited with status {proc.returncode}; see its log above")

    def fail(self, message: str) -> None:
        say(message)
        self.stop()
        sys.exit(1)

    def stop(self, *_: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        say("stopping...")
        # workers first (they drain), redis last
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in {STOP_TIMEOUT_S:.0f} s: killing it")
                proc.kill()
                proc.wait()
        if self.redis_dir:
            shutil.rmtree(self.redis_dir, ignore_errors=True)
        say("stopped")


def wait_ready(launcher: Launcher, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        launcher.check_children()
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    launcher.fail(f"the service was not ready after {READY_TIMEOUT_S:.0f} s")


def main() -> None:
    launcher = Launcher()

    def on_signal(*_: object) -> None:
        # make forwards the SIGTERM/SIGINT its process group got, so a second one arrives while
        # stop() runs: it must not cut the orderly stop short with sys.exit
        if launcher.stopping:
            return
        launcher.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not env.get("REDIS_URL"):
        env["REDIS_URL"] = launcher.start_redis(env)
    host = env.get("HOST", "127.0.0.1")
    port = env.get("PORT", "8000")
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"

    for name, argv in service_commands(host, port).items():
        launcher.spawn(name, [sys.executable, "-m", *argv], env)
    say("waiting for the API and a worker (the worker loads the model)...")
    wait_ready(launcher, url)
    say(f"ready: {url}  (API docs: {url}/docs)")
    say(
        "try:\n"
        f"  curl -s -X POST {url}/v1/txt2img -H 'Content-Type: application/json' \\\n"
        '       -d \'{"prompt": "a red circle in the top left on a blue background", "seed": 1}\'\n'
        f"  curl -s {url}/v1/jobs/JOB_ID\n"
        f"  curl -s -o out.png {url}/v1/jobs/JOB_ID/images/0.png\n"
        "Ctrl-C stops everything."
    )
    while True:
        launcher.check_children()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
