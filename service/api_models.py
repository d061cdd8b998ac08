"""Public request and response bodies of the HTTP API (kept apart from schemas/, the worker contract).

The request model is built from the settings, so the configurable bounds (prompt length, sizes,
image count) are enforced by pydantic, named in its 422 messages and published in /openapi.json.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, field_validator
from pydantic_core import PydanticCustomError

from schemas.errors import describe_error_types
from schemas.queue import SEED_MAX, JobStatus
from service.settings import SIZE_MULTIPLE, Settings

STEPS_MAX = 150
GUIDANCE_SCALE_MAX = 30.0

PROMPT_EXAMPLE = "a red circle in the top left on a blue background"  # what the embedded model draws
JOB_ID_EXAMPLE = "3f2c1a9e8b7d4c6e9a0b1c2d3e4f5a6b"


class Txt2ImgRequestBase(BaseModel):
    """Base of the settings-specific request model that `request_model()` builds."""


def _integral_float_to_int(value: object) -> object:
    """JSON Schema counts 6.0 as an integer: take it as 6. 5.5, "5" and true stay type errors."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(**constraints: Any) -> Any:
    """A strict integer as JSON sees one (6.0 counts; 5.5, "5" and true do not), within `constraints`.

    The constraints come before the BeforeValidator: the other way round, pydantic writes them
    into the JSON schema as raw `ge`/`le` keys that no client understands.
    """
    return Annotated[int, Field(strict=True, **constraints), BeforeValidator(_integral_float_to_int)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError(
            "string_blank", "String should contain at least one non-whitespace character"
        )
    return value


@lru_cache(maxsize=8)
def request_model(settings: Settings) -> type[Txt2ImgRequestBase]:
    """The POST /v1/txt2img body with the bounds of `settings` (cached: one class per settings)."""
    size_doc = (
        f"pixels, a multiple of {SIZE_MULTIPLE} in [{settings.min_size}, {settings.max_size}]; "
        f"width x height at most {settings.max_pixels}. Default: the served model's native size."
    )
    size = json_int(ge=settings.min_size, le=settings.max_size, multiple_of=SIZE_MULTIPLE)
    size_field = Field(None, description=size_doc)

    class Txt2ImgRequest(Txt2ImgRequestBase):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [
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
            },
        )

        prompt: StrictStr = Field(
            min_length=1,
            max_length=settings.max_prompt_chars,
            json_schema_extra={"pattern": r"\S"},  # enforced by _prompt_not_blank, with a clearer message
            description=f"What to draw: 1 to {settings.max_prompt_chars} characters, not only whitespace.",
        )
        negative_prompt: StrictStr = Field(
            "",
            max_length=settings.max_prompt_chars,
            description="What to steer away from (replaces the empty prompt).",
        )
        width: size | None = size_field
        height: size | None = size_field
        steps: json_int(ge=1, le=STEPS_MAX) = Field(
            settings.default_steps, description=f"DDIM steps, 1 to {STEPS_MAX}."
        )
        guidance_scale: float = Field(
            settings.default_guidance_scale,
            strict=True,
            ge=0,
            le=GUIDANCE_SCALE_MAX,
            allow_inf_nan=False,
            description=f"Classifier-free guidance, 0 to {GUIDANCE_SCALE_MAX:g} (<= 1: no unconditional pass).",
        )
        eta: float = Field(
            0.0, strict=True, ge=0, le=1, allow_inf_nan=False, description="DDIM eta, 0 (deterministic) to 1."
        )
        seed: json_int(ge=0, le=SEED_MAX) | None = Field(
            None,
            description=f"0 to {SEED_MAX}; null picks a random one. Image i uses seed + i.",
        )
        num_images: json_int(ge=1, le=settings.max_num_images) = Field(
            1, description=f"1 to {settings.max_num_images}."
        )
        preview: bool = Field(
            False,
            strict=True,
            description="While the job runs, publish a cheap low-resolution preview of the first image "
            "(`preview_url` of GET /v1/jobs/{id}).",
        )

        @field_validator("prompt")
        @classmethod
        def _prompt_not_blank(cls, value: str) -> str:
            return _not_blank(value)

    return Txt2ImgRequest


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


class ResolvedRequest(BaseModel):
    """The request as the worker runs it: defaults filled in, seed chosen."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    eta: float
    seed: int
    num_images: int


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
