"""Logging for the worker and janitor processes: one format, the project's level, RQ kept quiet.

RQ logs several INFO lines per job; ours already logs one line per job with what matters, so RQ's
loggers show warnings and errors only, unless SD_LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"


def configure_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(level=numeric, format=FORMAT, force=True)
    for name in ("rq", "rq.worker", "rq.queue", "rq.job", "rq.registry"):
        logging.getLogger(name).setLevel(
            max(numeric, logging.WARNING) if numeric > logging.DEBUG else numeric
        )
