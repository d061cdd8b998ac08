"""Public request and response bodies of the HTTP API (kept apart from schemas/, the worker contract).

The request model is derived from the one description of a generation (schemas/generation.py) with
the deployment's bounds (prompt length, sizes, image count), so they are enforced by pydantic,
named in its 422 messages and published in /openapi.json, without declaring a field twice.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from schemas.errors import describe_error_types
from schemas.generation import PROMPT_EXAMPLE, Generation, NonBlank, SamplerNames, derive_fields
from schemas.queue import JobStatus
from schemas.samplers import pair_rules
from service.settings import Settings

JOB_ID_EXAMPLE = "3f2c1a9e8b7d4c6e9a0b1c2d3e4f5a6b"

# Fields the server fills in when a request leaves them out, and what it fills them with.
SERVER_FILLED = {
    "width": "the served model's native width",
    "height": "the served model's native height",
    "steps": "the served model's recommendation (GET /v1/models), else SD_DEFAULT_STEPS",
    "guidance_scale": "the served model's recommendation (GET /v1/models), else SD_DEFAULT_GUIDANCE_SCALE",
    "sampler": "the served model's recommendation (GET /v1/models), else ddim",
    "scheduler": "the one an AUTOMATIC1111 sampler name implies, else the served model's recommendation "
    "when the sampler supports it, else normal",
    "seed": "a random seed, reported back in the job",
}


# Of those, the ones a client may also send as null.
NULLABLE = ("width", "height", "seed")


class Txt2ImgRequestBase(SamplerNames):
    """Base of the settings-specific request model that `request_model()` builds (it reads
    AUTOMATIC1111's combined sampler names, as Generation does)."""


def request_bounds(settings: Settings) -> dict[str, dict[str, Any]]:
    """The deployment's tighter bounds on Generation's fields (service/settings.py)."""
    size = {"ge": settings.min_size, "le": settings.max_size}
    return {
        "prompt": {"max_length": settings.max_prompt_chars},  # and NonBlank
        "negative_prompt": {"max_length": settings.max_prompt_chars},
        "width": size,
        "height": size,
        "num_images": {"le": settings.max_num_images},
    }


def _describe(fields: dict[str, tuple[Any, Any]], settings: Settings) -> None:
    """Say in each field's description what the server fills in and the deployment's bounds."""
    for name, (_, info) in fields.items():
        extra = []
        if name in ("width", "height"):
            extra.append(
                f"In [{settings.min_size}, {settings.max_size}]; width x height at most {settings.max_pixels}."
            )
        if name == "num_images":
            extra.append(f"1 to {settings.max_num_images}.")
        if name in SERVER_FILLED:
            left_out = "Left out or null" if name in NULLABLE else "Left out"
            extra.append(f"{left_out}: {SERVER_FILLED[name]}.")
        if extra:
            info.description = " ".join([info.description or "", *extra]).strip()


@lru_cache(maxsize=8)
def request_model(settings: Settings) -> type[Txt2ImgRequestBase]:
    """The POST /v1/txt2img body: Generation's fields, those in SERVER_FILLED optional, with the
    bounds of `settings` (cached: one class per settings)."""
    fields = derive_fields(
        nullable=NULLABLE,
        omittable=tuple(set(SERVER_FILLED) - set(NULLABLE)),
        bounds=request_bounds(settings),
    )
    fields["prompt"] = (NonBlank, fields["prompt"][1])  # a client must say what to draw
    _describe(fields, settings)
    examples = [
        {"prompt": PROMPT_EXAMPLE},
        {
            "prompt": PROMPT_EXAMPLE,
            "negative_prompt": "blurry, low quality",
            "width": 512,
            "height": 512,
            "steps": 30,
            "guidance_scale": 7.5,
            "eta": 0.0,
            "seed": 1234,
            "num_images": 2,
        },
    ]

    class WithConfig(Txt2ImgRequestBase):
        # "allOf": each sampler with the schedulers it can follow, so schema-valid means accepted
        model_config = ConfigDict(
            extra="forbid", json_schema_extra={"examples": examples, "allOf": pair_rules()}
        )

    model = create_model("Txt2ImgRequest", __base__=WithConfig, **fields)
    return model


class JobAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"id": JOB_ID_EXAMPLE, "status": "queued", "queue_position": 0}]}
    )

    id: str = Field(description="Job id: 32 random hex digits.")
    status: JobStatus = Field(description="`queued`, or `running` when an idle worker took it at once.")
    queue_position: int | None = Field(
        description="Jobs ahead of this one in the queue (0: next); null if not queued."
    )


class Progress(BaseModel):
    step: int = Field(description="Denoising steps done.")
    total_steps: int


class ImageLink(BaseModel):
    index: int
    seed: int = Field(description="The seed this image was generated with (request seed + index).")
    url: str = Field(description="Path of the PNG, relative to the API's root.")


class JobError(BaseModel):
    type: str = Field(description=describe_error_types())
    message: str


# The request as the worker runs it: Generation's fields, defaults filled in, seed chosen (`preview`,
# a delivery option, is reported as `preview_url`).
ResolvedRequest = create_model(
    "ResolvedRequest", **derive_fields(names=tuple(n for n in Generation.model_fields if n != "preview"))
)


JOB_VIEW_EXAMPLE: dict[str, Any] = {
    "id": JOB_ID_EXAMPLE,
    "status": "succeeded",
    "queue_position": None,
    "progress": {"step": 30, "total_steps": 30},
    "request": {
        "prompt": PROMPT_EXAMPLE,
        "negative_prompt": "",
        "width": 512,
        "height": 512,
        "steps": 30,
        "guidance_scale": 7.5,
        "eta": 0.0,
        "seed": 1234,
        "num_images": 1,
    },
    "model": "stable-diffusion-v1-5",
    "images": [{"index": 0, "seed": 1234, "url": f"/v1/jobs/{JOB_ID_EXAMPLE}/images/0.png"}],
    "preview_url": None,
    "error": None,
    "cancel_requested": False,
    "created_at": "2025-01-01T12:00:00Z",
    "started_at": "2025-01-01T12:00:01Z",
    "finished_at": "2025-01-01T12:00:05Z",
}


class JobView(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_VIEW_EXAMPLE]})

    id: str
    status: JobStatus
    queue_position: int | None = Field(
        description="Jobs ahead of this one in the queue (0: next); null if not queued."
    )
    progress: Progress
    request: ResolvedRequest
    model: str | None = Field(description="Model that generated the images (known once succeeded).")
    images: list[ImageLink] = Field(description="Empty until the job succeeded.")
    preview_url: str | None = Field(
        None,
        description="While running with `preview: true`: path of a low-resolution PNG of the current "
        "latent, replaced as the steps go on; null otherwise.",
    )
    error: JobError | None = Field(description="Why a failed job failed; null otherwise.")
    cancel_requested: bool = Field(description="DELETE was called; a running job stops at its next step.")
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description='Where: e.g. ["body", "steps"].')
    msg: str = Field(description="What is wrong, with the allowed bound.")
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[ValidationIssue]


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong, in words.")


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str


class Readiness(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"ready": True, "redis": True, "workers_alive": 1, "detail": "ready"},
                {"ready": False, "redis": True, "workers_alive": 0, "detail": "no live worker"},
            ]
        }
    )

    ready: bool
    redis: bool = Field(description="Redis answered PING.")
    workers_alive: int
    detail: str
