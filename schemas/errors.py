"""The error types a job can end with: `error.type` of GET /v1/jobs/{id}, one table for every process.

Workers write them (job.meta["error"]), the janitor writes WorkerDied, and the API reads them to
choose its answers (the OpenAI route: 400 for the client's faults, 502 for the others). A job
failed outside our workers' path (RQ's own bookkeeping) reports the failing exception's class name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorType(StrEnum):
    INVALID_REQUEST = "InvalidRequest"
    INVALID_PARAMS = "InvalidParams"
    PROMPT_ENCODING_FAILED = "PromptEncodingFailed"
    OUT_OF_MEMORY = "OutOfMemory"
    GENERATION_FAILED = "GenerationFailed"
    DECODING_FAILED = "DecodingFailed"
    IMAGE_ENCODING_FAILED = "ImageEncodingFailed"
    JOB_TIMED_OUT = "JobTimedOut"
    WORKER_ERROR = "WorkerError"
    WORKER_DIED = "WorkerDied"
    ABANDONED = "AbandonedJobError"
    JOB_STOPPED = "JobStopped"
    FORBIDDEN_JOB = "ForbiddenJob"
    JOB_FAILED = "JobFailed"
    # endings that are not failures a client sees: the job is canceled, or queued again
    JOB_CANCELED = "JobCanceled"
    WORKER_SHUTTING_DOWN = "WorkerShuttingDown"

    @property
    def retryable(self) -> bool:
        """Whether another attempt (RQ's Retry) could succeed where this one failed."""
        return ERROR_TRAITS[self].retryable

    @property
    def client_fault(self) -> bool:
        """Whether the request itself is at fault (a 4xx), not the service."""
        return ERROR_TRAITS[self].client_fault

    @property
    def meaning(self) -> str:
        return ERROR_TRAITS[self].meaning


@dataclass(frozen=True)
class ErrorTraits:
    retryable: bool
    client_fault: bool
    meaning: str


ERROR_TRAITS: dict[ErrorType, ErrorTraits] = {
    ErrorType.INVALID_REQUEST: ErrorTraits(False, True, "the request cannot run on the model (a limit of the model)"),
    ErrorType.INVALID_PARAMS: ErrorTraits(False, True, "the job's parameters do not validate on the worker"),
    ErrorType.PROMPT_ENCODING_FAILED: ErrorTraits(False, False, "the prompt could not be encoded"),
    ErrorType.OUT_OF_MEMORY: ErrorTraits(False, False, "one image alone does not fit in the device's memory"),
    ErrorType.GENERATION_FAILED: ErrorTraits(False, False, "a denoising step failed for this request"),
    ErrorType.DECODING_FAILED: ErrorTraits(False, False, "the VAE could not decode the pictures"),
    ErrorType.IMAGE_ENCODING_FAILED: ErrorTraits(False, False, "the VAE could not encode the input images"),
    ErrorType.JOB_TIMED_OUT: ErrorTraits(False, False, "the job ran longer than its time limit"),
    ErrorType.WORKER_ERROR: ErrorTraits(True, False, "the worker failed (engine crash, results not stored)"),
    ErrorType.WORKER_DIED: ErrorTraits(False, False, "the worker died and the job had no retries left"),
    ErrorType.ABANDONED: ErrorTraits(False, False, "the worker stopped heartbeating"),
    ErrorType.JOB_STOPPED: ErrorTraits(False, False, "an operator stopped the job"),
    ErrorType.FORBIDDEN_JOB: ErrorTraits(False, False, "the job names a function that is not this service's"),
    ErrorType.JOB_FAILED: ErrorTraits(False, False, "the job failed for an unknown reason"),
    ErrorType.JOB_CANCELED: ErrorTraits(False, True, "canceled by its client (status canceled)"),
    ErrorType.WORKER_SHUTTING_DOWN: ErrorTraits(False, False, "handed back to the queue by a stopping worker"),
}  # fmt: skip

# What a client can see as error.type of a failed job (the rest end as canceled or queued).
PUBLIC_ERROR_TYPES = tuple(
    t for t in ErrorType if t not in (ErrorType.JOB_CANCELED, ErrorType.WORKER_SHUTTING_DOWN)
)


def describe_error_types() -> str:
    """The error types as the public schema documents them."""
    listed = "; ".join(f"`{t.value}`: {t.meaning}" for t in PUBLIC_ERROR_TYPES)
    return f"One of {listed}. A failure outside the workers reports the exception's class name."


def is_client_fault(type_name: str) -> bool:
    """Whether a job's error.type says the request was at fault (an unknown name: no)."""
    try:
        return ErrorType(type_name).client_fault
    except ValueError:
        return False
