"""One worker process per device: `python -m workers.launcher` (what the worker image runs).

SD_DEVICES picks the devices: `all` (every CUDA device this process sees, or one CPU worker when it
sees none), or a comma list such as `0,1,3` (CUDA indices as numbered under CUDA_VISIBLE_DEVICES;
`cpu` for a CPU worker). Each child runs `python -m workers.main` with SD_DEVICE=cuda:N (or cpu) and
SD_WORKER_NAME=<SD_WORKER_NAME or the host name>-cudaN, so no two workers share a device or a name.
A launcher rather than one container per GPU: Docker maps a GPU count to devices 0..count-1 in every
container, so replicas of one service would all get GPU 0.

- SIGTERM and SIGINT are forwarded to every child, each time one comes: the first makes the workers
  drain (running jobs finish, queued ones stay in Redis), a second makes them hand their running jobs
  back at once (workers/main.py). The launcher exits once all children have: 0 if all stopped
  cleanly, else 1.
- A child that dies unexpectedly is restarted after 1 s, doubling up to 60 s while it keeps dying
  (back to 1 s once a child has run for 10 minutes), with one log line each time.
- A child that exits with status 2 (bad configuration or a model it cannot load: restarting cannot
  fix that) makes the launcher stop the others and exit with 2.

The container's health check (workers/healthcheck.py) is healthy only while every child beats: the
launcher lists their heartbeat files. Torch is imported only by a short-lived subprocess that counts
the CUDA devices, so the launcher stays small and never holds a CUDA context.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, field_validator

from schemas.settings import CommonSettings, ConfigurationError, configure_logging, load_settings
from workers.healthcheck import HEARTBEAT_DIR, heartbeat_file, remove_expected, write_expected

log = logging.getLogger("workers.launcher")  # not __main__ under -m

WORKER_COMMAND = (sys.executable, "-m", "workers.main")
EXIT_UNFIXABLE = 2  # workers/main.py: bad configuration or an unloadable model
COUNT_TIMEOUT_S = 120.0  # importing torch on a cold disk
COUNT_CUDA_DEVICES = "import torch; print(torch.cuda.device_count())"  # no CUDA context is created


class LauncherSettings(CommonSettings):
    """What the launcher reads (each child reads the worker's settings, workers/settings.py)."""

    devices: str = Field(
        "all",
        description="launcher: one worker process per device: all (every visible CUDA device, else one "
        "CPU worker), or a comma list of CUDA indices (0,1,3) and/or cpu",
    )
    worker_name: str | None = Field(None, description="name in Redis (default: hostname-pid)")

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        value = value.strip().lower()
        return value if value == "all" else ",".join(parse_device_list(value))


def parse_device_list(text: str) -> list[str]:
    """Parse "0,cuda:1,cpu" into ["cuda:0", "cuda:1", "cpu"]; ValueError for anything else or a repeat."""
    devices = []
    for part in (p.strip() for p in text.split(",")):
        index = part.removeprefix("cuda:")
        if part == "cpu":
            devices.append("cpu")
        elif index.isdigit():
            devices.append(f"cuda:{int(index)}")
        else:
            raise ValueError(f"must be all, or a comma list of CUDA indices and cpu (got {part!r} in it)")
    repeated = sorted({d for d in devices if devices.count(d) > 1})
    if repeated:
        raise ValueError(f"names {', '.join(repeated)} more than once: one worker per device")
    return devices


def count_cuda_devices() -> int:
    """CUDA devices this process may use (CUDA_VISIBLE_DEVICES honoured), counted by a subprocess."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", COUNT_CUDA_DEVICES],
            capture_output=True,
            text=True,
            timeout=COUNT_TIMEOUT_S,
            check=True,
        )
        return int(result.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as error:
        detail = getattr(error, "stderr", None) or error
        raise ConfigurationError(f"cannot count the CUDA devices with torch: {detail}") from None


def resolve_devices(spec: str, count: Callable[[], int] = count_cuda_devices) -> list[str]:
    """The devices of SD_DEVICES (as validated by LauncherSettings), checked against what exists."""
    if spec == "all":
        visible = count()
        return [f"cuda:{i}" for i in range(visible)] or ["cpu"]
    devices = spec.split(",")
    indices = [int(d.removeprefix("cuda:")) for d in devices if d != "cpu"]
    if indices:
        visible = count()
        missing = ", ".join(str(i) for i in indices if i >= visible)
        if missing:
            shown = f"{visible} (0-{visible - 1})" if visible else "none"
            raise ConfigurationError(f"SD_DEVICES: no CUDA device {missing}: this machine shows {shown}")
    return devices


def worker_name(base: str, device: str) -> str:
    return f"{base}-{device.replace(':', '')}"


@dataclass(frozen=True)
class Backoff:
    """Delays between restarts of a child that keeps dying."""

    initial_s: float = 1.0
    max_s: float = 60.0
    reset_after_s: float = 600.0  # a child that ran this long before dying starts again at initial_s

    def next_delay(self, previous_s: float, ran_s: float) -> float:
        if previous_s <= 0 or ran_s >= self.reset_after_s:
            return self.initial_s
        return min(previous_s * 2, self.max_s)


@dataclass
class Child:
    device: str
    name: str
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay_s: float = 0.0  # the last restart delay (0: none since it last ran for a while)
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM (a drain) if the launcher dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Launcher:
    def __init__(
        self,
        devices: Sequence[str],
        base_name: str,
        command: Sequence[str] = WORKER_COMMAND,
        heartbeat_dir: Path = HEARTBEAT_DIR,
        backoff: Backoff | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.children = [Child(device, worker_name(base_name, device)) for device in devices]
        self.command = list(command)
        self.heartbeat_dir = heartbeat_dir
        self.backoff = backoff or Backoff()
        self.poll_s = poll_s
        self.stopping = False
        self.exit_code = 0
        self._pending_signals: list[int] = []

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        write_expected(
            [heartbeat_file(c.device, self.heartbeat_dir) for c in self.children], self.heartbeat_dir
        )
        try:
            log.info(
                "starting %d worker(s): %s",
                len(self.children),
                ", ".join(f"{c.name} on {c.device}" for c in self.children),
            )
            for child in self.children:
                self._start(child)
            while not (self.stopping and all(c.process is None for c in self.children)):
                self._forward_signals()
                self._tend(time.monotonic())
                time.sleep(self.poll_s)
        finally:
            remove_expected(self.heartbeat_dir)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("all workers stopped")
        return self.exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._pending_signals.append(signum)  # forwarded by the loop: no Popen calls in a handler

    def _forward_signals(self) -> None:
        while self._pending_signals:
            signum = self._pending_signals.pop(0)
            name = signal.Signals(signum).name
            if not self.stopping:
                log.info("%s: stopping the workers (they drain; a second signal hands jobs back)", name)
            else:
                log.warning("%s again: forwarded to the workers", name)
            self._stop(signum)

    def _stop(self, signum: int) -> None:
        self.stopping = True
        for child in self.children:
            child.restart_at = None
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)

    def _tend(self, now: float) -> None:
        """Notice exits, restart what is due."""
        for child in self.children:
            if child.process is not None and (code := child.process.poll()) is not None:
                child.process = None
                child.exit_codes.append(code)
                self._exited(child, code, now)
            if child.process is None and child.restart_at is not None and now >= child.restart_at:
                self._start(child)

    def _exited(self, child: Child, code: int, now: float) -> None:
        if self.stopping:
            log.info("worker on %s %s", child.device, describe_exit(code))
            if code != 0 and self.exit_code == 0:
                self.exit_code = 1
            return
        if code == EXIT_UNFIXABLE:
            log.error(
                "worker on %s exited with status %d (bad configuration or a model it cannot load): a "
                "restart cannot fix that; stopping the others",
                child.device,
                code,
            )
            self.exit_code = EXIT_UNFIXABLE
            self._stop(signal.SIGTERM)
            return
        child.delay_s = self.backoff.next_delay(child.delay_s, now - child.started_at)
        child.restart_at = now + child.delay_s
        log.warning("worker on %s %s; restarting in %g s", child.device, describe_exit(code), child.delay_s)

    def _start(self, child: Child) -> None:
        env = dict(os.environ, SD_DEVICE=child.device, SD_WORKER_NAME=child.name)
        # its own process group: a Ctrl-C in a terminal reaches the launcher alone, which forwards it
        # once (the terminal's copy would count as a second signal and hand jobs back)
        child.process = subprocess.Popen(self.command, env=env, process_group=0, preexec_fn=_die_with_parent)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started worker %s on %s (pid %d)", child.name, child.device, child.process.pid)


def main() -> int:
    try:
        settings = load_settings(LauncherSettings)
    except ConfigurationError as error:
        configure_logging("INFO")
        log.error("%s", error)
        return EXIT_UNFIXABLE
    configure_logging(settings.log_level)
    if os.environ.get("SD_DEVICE"):
        log.warning("SD_DEVICE is set for each worker by the launcher: choose devices with SD_DEVICES")
    try:
        devices = resolve_devices(settings.devices)
    except ConfigurationError as error:
        log.error("%s", error)
        return EXIT_UNFIXABLE
    return Launcher(devices, settings.worker_name or socket.gethostname()).run()


if __name__ == "__main__":
    sys.exit(main())
