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
from schemas.generation import (
    IMAGE_FIELDS,
    PROMPT_EXAMPLE,
    Generation,
    NonBlank,
    SamplerNames,
    derive_fields,
    output_rules,
)
from schemas.queue import JobStatus
from schemas.samplers import pair_rules
from service.settings import Settings
from service.webhook_url import webhook_url_field

JOB_ID_EXAMPLE = "3f2c1a9e8b7d4c6e9a0b1c2d3e4f5a6b"

# Fields the server fills in when a request leaves them out, and what it fills them with.
SERVER_FILLED = {
    "model": "SD_DEFAULT_MODEL, else the only model served (with several, a 422 naming them)",
    "width": "the chosen model's native width",
    "height": "the chosen model's native height",
    "steps": "the chosen model's recommendation (GET /v1/models), else SD_DEFAULT_STEPS",
    "guidance_scale": "the chosen model's recommendation (GET /v1/models), else SD_DEFAULT_GUIDANCE_SCALE",
    "sampler": "the chosen model's recommendation (GET /v1/models), else ddim",
    "scheduler": "the one an AUTOMATIC1111 sampler name implies, else the chosen model's recommendation "
    "when the sampler supports it, else normal",
    "seed": "a random seed, reported back in the job",
}


# Of those, the ones a client may also send as null.
NULLABLE = ("model", "width", "height", "seed")

# Request fields that say how to deliver the result, not what to draw: never part of the Generation.
DELIVERY_FIELDS = ("webhook_url",)


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
        "loras": {"max_length": settings.max_loras_per_request},  # prompt tags: service/resolve.py
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
    """The POST /v1/txt2img body: Generation's fields but the image ones (IMAGE_FIELDS), those in
    SERVER_FILLED optional, with the bounds of `settings` (cached: one class per settings)."""
    fields = derive_fields(
        names=tuple(name for name in Generation.model_fields if name not in IMAGE_FIELDS),
        nullable=NULLABLE,
        omittable=tuple(set(SERVER_FILLED) - set(NULLABLE)),
        bounds=request_bounds(settings),
    )
    fields["prompt"] = (NonBlank, fields["prompt"][1])  # a client must say what to draw
    _describe(fields, settings)
    fields["webhook_url"] = webhook_url_field(enabled=bool(settings.webhook_allowed_hosts))  # DELIVERY_FIELDS
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
            extra="forbid",
            json_schema_extra={"examples": examples, "allOf": [*pair_rules(), *output_rules()]},
        )

    model = create_model("Txt2ImgRequest", __base__=WithConfig, **fields)
    return model


@lru_cache(maxsize=8)
def edit_request_model(settings: Settings) -> type[Txt2ImgRequestBase]:
    """A request with input images as the routes that take them queue it (service/image_jobs.py): the
    txt2img request plus Generation's image fields. `init_image` and `mask_image` are the names of the
    stored files, which only the API sets: no client body is validated by this model."""
    return create_model("EditRequest", __base__=request_model(settings), **derive_fields(names=IMAGE_FIELDS))


IMG2IMG_EXAMPLE = {
    "prompt": PROMPT_EXAMPLE,
    # an 8x8 blue PNG (the job is then the smallest size the deployment allows)
    "init_image": "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mPUiDrBgA0wMeAAg1MCAAWzAVqiKYDVAAAAAElFTkSuQmCC",
    "mask_image": None,
    "strength": 0.6,
    "steps": 30,
    "seed": 1234,
}


@lru_cache(maxsize=8)
def img2img_request_model(settings: Settings) -> type[Txt2ImgRequestBase]:
    """The POST /v1/img2img body: the txt2img request, Generation's image settings, and the images
    themselves (base64 in JSON; files in multipart/form-data)."""
    image = "The image file (PNG, JPEG or WebP), base64-encoded in JSON (a data: URL prefix is accepted), a file part in multipart/form-data."
    fields: dict[str, Any] = {
        "init_image": (
            str,
            Field(
                description=f"The image to start from. {image} Fitted to width x height by resize_mode; width "
                "and height left out: the image's own size, scaled down to the deployment's limits and rounded "
                "down to the model's size multiple.",
                json_schema_extra={"contentEncoding": "base64"},
            ),
        ),
        "mask_image": (
            str | None,
            Field(
                None,
                description=f"Inpainting: the mask, the init image's size. {image} White is repainted, black "
                "kept (read as grayscale, blurred by mask_blur, then binarized at 0.5); all black: the init "
                "image comes back (through the VAE). Null or absent: img2img of the whole image.",
                json_schema_extra={"contentEncoding": "base64"},
            ),
        ),
    }

    class WithExamples(edit_request_model(settings)):  # type: ignore[misc, valid-type]
        model_config = ConfigDict(
            json_schema_extra={"examples": [IMG2IMG_EXAMPLE], "allOf": [*pair_rules(), *output_rules()]}
        )

    return create_model("Img2ImgRequest", __base__=WithExamples, **fields)


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
    url: str = Field(
        description="Path of the image file (its extension: the output_format), relative to the API's root."
    )


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
    "warnings": [],
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
        description="While running with `preview: true`: path of a low-resolution PNG of the model's "
        "current estimate of the final picture, replaced as the steps go on; null otherwise.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What to know about how the request is drawn, as soon as the worker knows it: e.g. "
        "the words of the prompt a small model trained on a closed vocabulary ignores (the embedded "
        "model). Empty for real checkpoints.",
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
                {
                    "ready": True,
                    "redis": True,
                    "workers_alive": 3,
                    "models": {"stable-diffusion-v1-5": 2, "sdxl-base": 1},
                    "detail": "ready",
                },
                {"ready": False, "redis": True, "workers_alive": 0, "models": {}, "detail": "no live worker"},
            ]
        }
    )

    ready: bool
    redis: bool = Field(description="Redis answered PING.")
    workers_alive: int
    models: dict[str, int] = Field(
        default_factory=dict,
        description="Live workers of each model served or known (seen in the last week, or SD_DEFAULT_MODEL).",
    )
    detail: str
