"""What travels through the RQ queue beside the generation itself (schemas/generation.py): the queue,
the job function, the statuses a client sees and the job's result."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

# RQ queue the API enqueues on and the workers consume.
QUEUE_NAME = "txt2img"
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


class ImageRef(BaseModel):
    """One generated PNG: its index in the request, its seed and the Redis key holding its bytes."""

    index: int
    seed: int
    key: str


class JobResult(BaseModel):
    """The RQ job result: small JSON, never image bytes."""

    model: str
    images: list[ImageRef]
    # queue_wait_s, run_s (admission to last PNG stored), and whatever else the worker measures
    timings: dict[str, float] = Field(default_factory=dict)
