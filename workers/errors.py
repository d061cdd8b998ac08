"""How a job can end other than with its images, and what RQ should do about each.

The engine completes a job's ticket with one of these; the job function raises it; the slot worker
(workers/slots.py) turns it into RQ's bookkeeping:

| exception          | RQ status                  | retried (Retry(max=...))? | job.meta["error"] |
|--------------------|----------------------------|---------------------------|-------------------|
| JobCanceled        | canceled (CanceledJobRegistry) | no                    | -                 |
| RequestFailed      | failed                     | no: it would fail again   | {type, message}   |
| JobTimedOut        | failed                     | no: it would time out again | {type, message} |
| WorkerShuttingDown | queued again, at the front | not counted as a retry    | -                 |
| EngineFailure      | failed, or queued for retry | yes, while retries are left | {type, message} when final |

Imports nothing heavy: the janitor and the API-side tests may import it.
"""

from __future__ import annotations


class JobEnded(Exception):
    """Base: a job ended without images. `error_type` is what the API shows as error.type."""

    error_type = "JobFailed"
    retryable = False

    @property
    def message(self) -> str:
        return str(self)


class JobCanceled(JobEnded):
    """The API asked (cancel key) to stop the job; it left the batch between two steps."""

    error_type = "JobCanceled"


class RequestFailed(JobEnded):
    """This request cannot be served (invalid for the model, prompt failed to encode, ...).

    Deterministic: retrying it would fail the same way, and its batch-mates are not affected.
    """

    def __init__(self, message: str, error_type: str = "RequestFailed") -> None:
        super().__init__(message)
        self.error_type = error_type


class JobTimedOut(JobEnded):
    """The job ran longer than its RQ job_timeout; the engine stopped it between two steps."""

    error_type = "JobTimedOut"


class WorkerShuttingDown(JobEnded):
    """The worker is draining (SIGTERM) and the job was not done in time: it goes back to the queue."""

    error_type = "WorkerShuttingDown"


class EngineFailure(JobEnded):
    """Something failed that is not the request's fault (engine crash, Redis lost while storing)."""

    error_type = "WorkerError"
    retryable = True
