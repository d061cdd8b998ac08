"""Pure translations from RQ's view of a job to the API's: status names and failure reasons.

A client sees an error's type and message, never a traceback, file path or module path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from rq.job import JobStatus as RqStatus

from schemas.errors import ErrorType
from schemas.queue import JobStatus

RQ_TO_API: dict[RqStatus, JobStatus] = {
    RqStatus.CREATED: JobStatus.QUEUED,
    RqStatus.QUEUED: JobStatus.QUEUED,
    RqStatus.DEFERRED: JobStatus.QUEUED,
    RqStatus.SCHEDULED: JobStatus.QUEUED,
    RqStatus.STARTED: JobStatus.RUNNING,
    RqStatus.FINISHED: JobStatus.SUCCEEDED,
    RqStatus.FAILED: JobStatus.FAILED,
    RqStatus.STOPPED: JobStatus.FAILED,
    RqStatus.CANCELED: JobStatus.CANCELED,
}

TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

MAX_MESSAGE_CHARS = 500
# The exception line of a traceback: "ValueError: msg", "rq.timeouts.JobTimeoutException: msg", "KeyError".
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::\s?(?P<message>.*))?$")

# Failures RQ records without a traceback (worker death, stop command, registry cleanup).
_RQ_MESSAGES: tuple[tuple[str, ErrorType, str], ...] = (
    (
        "AbandonedJobError",
        ErrorType.ABANDONED,
        "the worker running this job stopped heartbeating (died or was killed)",
    ),
    ("Work-horse terminated unexpectedly", ErrorType.WORKER_DIED, "the worker running this job died"),
    ("Job stopped by user", ErrorType.JOB_STOPPED, "the job was stopped by an operator"),
)


def api_status(rq_status: RqStatus | str | None) -> JobStatus:
    """Map RQ's status to the API's (a job RQ does not know yet counts as queued)."""
    return RQ_TO_API.get(RqStatus(rq_status), JobStatus.QUEUED) if rq_status else JobStatus.QUEUED


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def error_from_exc_string(exc_string: str | None) -> tuple[str, str]:
    """(type, message) of the last exception in an RQ failure text; never the traceback itself."""
    text = (exc_string or "").strip()
    if not text:
        return ErrorType.JOB_FAILED, "the job failed without an error message"
    for marker, error_type, message in _RQ_MESSAGES:
        if marker in text:
            return error_type, message
    lines = text.splitlines()
    if not lines[0].startswith("Traceback"):
        return ErrorType.JOB_FAILED, _short(lines[-1])
    # The exception line is the first unindented line after the last frame ("  File ...", then code).
    last_frame = max((i for i, line in enumerate(lines) if line.startswith("  File ")), default=0)
    for i in range(last_frame + 1, len(lines)):
        if not lines[i].startswith((" ", "\t")):
            match = _EXCEPTION_LINE.match(lines[i])
            if match is None:
                break
            error_type = match["type"].rsplit(".", 1)[-1]  # drop module paths
            message = "\n".join([match["message"] or "", *lines[i + 1 :]])
            return error_type, _short(message) or error_type
    return ErrorType.JOB_FAILED, "the job failed"


def error_from_meta(meta: Mapping[str, object]) -> tuple[str, str] | None:
    """The optional `error: {type, message}` a worker may put in job.meta (preferred when present)."""
    error = meta.get("error")
    if isinstance(error, Mapping) and isinstance(error.get("message"), str):
        error_type = error.get("type")
        return (error_type if isinstance(error_type, str) and error_type else ErrorType.JOB_FAILED), _short(
            error["message"]
        )
    return None
