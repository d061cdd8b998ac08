"""How a job can end other than with its images, and what RQ should do about each.

The engine completes a job's ticket with one of these; the job function raises it; the slot worker
(workers/slots.py) turns it into RQ's bookkeeping. Each carries an `ErrorType` (schemas/errors.py),
which says whether another attempt could succeed:

| exception          | RQ status                      | retried (Retry(max=...))?     | job.meta["error"]    |
|--------------------|--------------------------------|-------------------------------|----------------------|
| JobCanceled        | canceled (CanceledJobRegistry) | no                            | -                    |
| RequestFailed      | failed                         | no: it would fail again       | {type, message}      |
| JobTimedOut        | failed                         | no: it would time out again   | {type, message}      |
| WorkerShuttingDown | queued again, at the front     | not counted as a retry        | -                    |
| EngineFailure      | failed, or queued for retry    | yes, while retries are left   | {type, message} when final |

Imports nothing heavy: the janitor and the API-side tests may import it.
"""

from __future__ import annotations

from schemas.errors import ErrorType


class JobEnded(Exception):
    """Base: a job ended without images; `error_type` is what the API shows as error.type."""

    error_type: ErrorType = ErrorType.JOB_FAILED

    def __init__(self, message: str, error_type: ErrorType | None = None) -> None:
        super().__init__(message)
        if error_type is not None:
            self.error_type = error_type

    @property
    def retryable(self) -> bool:
        return self.error_type.retryable

    @property
    def message(self) -> str:
        return str(self)


class JobCanceled(JobEnded):
    """The API asked (cancel key) to stop the job; it left the batch between two steps."""

    error_type = ErrorType.JOB_CANCELED


class RequestFailed(JobEnded):
    """This request cannot be served (invalid for the model, prompt failed to encode, ...).

    Deterministic: retrying it would fail the same way, and its batch-mates are not affected.
    """


class JobTimedOut(JobEnded):
    """The job ran longer than its RQ job_timeout; the engine stopped it between two steps."""

    error_type = ErrorType.JOB_TIMED_OUT


class WorkerShuttingDown(JobEnded):
    """The worker is draining (SIGTERM) and the job was not done in time: it goes back to the queue."""

    error_type = ErrorType.WORKER_SHUTTING_DOWN


class EngineFailure(JobEnded):
    """Something failed that is not the request's fault (engine crash, Redis lost while storing)."""

    error_type = ErrorType.WORKER_ERROR
