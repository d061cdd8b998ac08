"""What travels through the RQ queues beside the generation itself (schemas/generation.py): the queues,
the job function, the statuses a client sees and the job's result."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from schemas.generation import OutputFormat

# RQ queues: one per model, `txt2img:<model name>` (schemas/model_names.py says what a name may be).
# The API enqueues a job on its model's queue; each worker consumes its own model's queue only; the
# janitor sweeps every queue RQ knows (its set of queues) whose name starts with the prefix.
QUEUE_PREFIX = "txt2img"


def queue_name(model: str) -> str:
    """The RQ queue of a model's jobs."""
    return f"{QUEUE_PREFIX}:{model}"


def model_of_queue(name: str) -> str | None:
    """The model whose queue `name` is, or None for another queue."""
    prefix = f"{QUEUE_PREFIX}:"
    return name.removeprefix(prefix) if name.startswith(prefix) and len(name) > len(prefix) else None


# Import path of the job function; RQ resolves it in the worker (JSON serializer: no pickle).
JOB_FUNCTION = "workers.job_function.generate"
# What a worker agrees to run (workers/rq_internals.py: AllowlistedJob); any other name fails.
JOB_FUNCTIONS = frozenset({JOB_FUNCTION})


class JobStatus(StrEnum):
    """The statuses a client sees (RQ's own statuses are mapped onto these by the API)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


# Content type of each output format; the format's name is also its file extension in URLs.
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageRef(BaseModel):
    """One generated image file: its index in the request, its seed, the Redis key holding its bytes
    and its format (png when a worker that predates formats wrote it)."""

    index: int
    seed: int
    key: str
    format: OutputFormat = "png"

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


# job.meta[WARNINGS_META]: a job's JobResult.warnings, set by the worker as soon as it takes the job, so
# a client sees them while it runs (and on a job that failed or was canceled)
WARNINGS_META = "warnings"


class JobResult(BaseModel):
    """The RQ job result: small JSON, never image bytes."""

    model: str
    images: list[ImageRef]
    # queue_wait_s, run_s (admission to last PNG stored), and whatever else the worker measures
    timings: dict[str, float] = Field(default_factory=dict)
    # what the user should know about how the request was drawn (schemas/vocabulary.py: the words of
    # its prompts a model trained on a closed vocabulary ignored); empty for real checkpoints
    warnings: list[str] = Field(default_factory=list)
