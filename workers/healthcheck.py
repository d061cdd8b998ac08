"""Container health check of the workers: `python -m workers.healthcheck` exits 0 while every worker
process of the container has a fresh heartbeat file, 1 otherwise (with the reasons on stderr).

Each worker's heartbeat thread touches its file, HEARTBEAT_DIR/<device>.heartbeat, on every beat
while its engine thread lives, whether or not Redis answers (a worker riding out a Redis outage is
healthy; one whose engine died, that hangs, or that the launcher is restarting, is not). The
launcher (workers/launcher.py), which starts one worker per device, lists the files of all its
workers in HEARTBEAT_DIR/expected: the container is healthy only while every one of them is fresh.
A worker started alone, without that list, is judged by the newest file. Imports no torch: it runs
every few seconds. Outside containers nothing reads these files.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from workers.settings import ConfigurationError, load_settings

HEARTBEAT_DIR = Path(tempfile.gettempdir()) / "sdserve-heartbeats"
EXPECTED_NAME = "expected"  # the launcher's list of its workers' heartbeat file names, one a line
MIN_STALE_S = 10.0  # and at least 5 missed beats


def heartbeat_file(device: str, folder: Path = HEARTBEAT_DIR) -> Path:
    """The heartbeat file of the worker on `device` (SD_DEVICE: cpu, cuda:1...): one per device, so
    the launcher knows each child's file and a restarted child takes over its predecessor's."""
    return folder / f"{device.replace(':', '-')}.heartbeat"


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{time.time():.3f}\n")


def check(path: Path, heartbeat_interval_s: float, now: float | None = None) -> str | None:
    """None when healthy, else why not."""
    try:
        beat = float(path.read_text().strip())
    except (OSError, ValueError) as error:
        return f"no readable heartbeat file at {path}: {error}"
    age_s = (now if now is not None else time.time()) - beat
    limit_s = max(MIN_STALE_S, 5 * heartbeat_interval_s)
    if age_s > limit_s:
        return (
            f"last heartbeat {age_s:.0f} s ago (limit {limit_s:.0f} s): the engine died or the worker hangs"
        )
    return None


def write_expected(files: list[Path], folder: Path = HEARTBEAT_DIR) -> None:
    """The launcher's list of its workers' files; older heartbeat files go, so none can stand in for a
    worker that has not beaten yet."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.heartbeat"):
        old.unlink(missing_ok=True)
    temporary = folder / f".{EXPECTED_NAME}.tmp"
    temporary.write_text("".join(f"{path.name}\n" for path in files))
    temporary.replace(folder / EXPECTED_NAME)  # a healthcheck never reads half a list


def remove_expected(folder: Path = HEARTBEAT_DIR) -> None:
    (folder / EXPECTED_NAME).unlink(missing_ok=True)


def check_all(
    heartbeat_interval_s: float, folder: Path = HEARTBEAT_DIR, now: float | None = None
) -> list[str]:
    """Why the container's workers are not all healthy: empty when they are."""
    try:
        names = (folder / EXPECTED_NAME).read_text().split()
    except FileNotFoundError:
        names = None
    if names is None:  # a worker started without the launcher
        beats = sorted(folder.glob("*.heartbeat"), key=lambda path: path.stat().st_mtime)
        if not beats:
            return [f"no heartbeat file in {folder}: the worker is not up yet"]
        names = [beats[-1].name]
    if not names:
        return [f"{folder / EXPECTED_NAME} lists no worker"]
    problems = (check(folder / name, heartbeat_interval_s, now) for name in names)
    return [f"{name}: {problem}" for name, problem in zip(names, problems, strict=True) if problem]


def main() -> int:
    try:
        settings = load_settings()
    except ConfigurationError as error:
        print(error, file=sys.stderr)
        return 1
    problems = check_all(settings.heartbeat_interval_s)
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
