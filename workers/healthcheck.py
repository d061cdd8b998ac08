"""Container health check of a worker: `python -m workers.healthcheck` exits 0 while the worker's
heartbeat file is fresh, 1 otherwise (with the reason on stderr).

The worker's heartbeat thread touches HEARTBEAT_FILE on every beat while its engine thread lives,
whether or not Redis answers (a worker riding out a Redis outage is healthy; one whose engine
died, or that hangs, is not). Imports no torch: it runs every few seconds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from workers.settings import ConfigurationError, load_settings

# One worker per container; outside containers nothing reads it.
HEARTBEAT_FILE = Path(tempfile.gettempdir()) / "sdserve-worker.heartbeat"
MIN_STALE_S = 10.0  # and at least 5 missed beats


def touch(path: Path = HEARTBEAT_FILE) -> None:
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


def main() -> int:
    try:
        settings = load_settings()
    except ConfigurationError as error:
        print(error, file=sys.stderr)
        return 1
    problem = check(HEARTBEAT_FILE, settings.heartbeat_interval_s)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
