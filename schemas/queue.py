"""What travels through the RQ queue: the resolved generation request and the job's result."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

# RQ queue the API enqueues on and the workers consume.
QUEUE_NAME = "txt2img"
# Import path of the job function; RQ resolves it in the worker (JSON serializer: no pickle).
JOB_FUNCTION = "workers.job_function.generate"
# What a worker agrees to run (workers/rq_internals.py: AllowlistedJob); any other name fails.
JOB_FUNCTIONS = frozenset({JOB_FUNCTION})

SEED_MAX = 2**32 - 1


class JobStatus(StrEnum):
    """The statuses a client sees (RQ's own statuses are mapped onto these by the API)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class GenerationParams(BaseModel):
    """A fully resolved request, as a worker receives it (defaults filled, seed chosen)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str = ""
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    eta: float = Field(ge=0, le=1)
    seed: int = Field(ge=0, le=SEED_MAX)
    num_images: int = Field(ge=1)
    # Publish a small PNG of the latent at preview_key(job id) while denoising (the API's `preview`).
    preview: bool = False

    def image_seeds(self) -> list[int]:
        """Image i of a request with seed s uses seed s + i (DESIGN.md)."""
        return [self.seed + i for i in range(self.num_images)]


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
