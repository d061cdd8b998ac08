"""Bodies of the OpenAI-compatible routes (`/v1/images/generations`, `/v1/models`), in OpenAI's shapes.

The request reuses the field definitions of POST /v1/txt2img (same types, bounds and messages),
renamed where OpenAI names them differently (`n` for `num_images`, `size` "WxH" for width and
height). After this model, the translated request is validated again by the txt2img model itself
(service/routes/openai_images.py), so every rule lives in one place: service/api_models.py.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, create_model

from schemas.generation import SamplerNames, derive_fields, output_rules
from schemas.samplers import pair_rules
from service.api_models import PROMPT_EXAMPLE, request_model
from service.settings import SIZE_MULTIPLE, Settings

SIZE_PATTERN = re.compile(r"^(?P<width>[0-9]{1,6})x(?P<height>[0-9]{1,6})$")
USER_MAX_CHARS = 256

# txt2img fields taken over unchanged, and the one renamed: OpenAI name -> txt2img name.
SHARED_FIELDS = (
    "model",
    "prompt",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "eta",
    "sampler",
    "scheduler",
    "seed",
    "output_format",
    "output_compression",
)
RENAMED_FIELDS = {"n": "num_images"}
# Shared fields OpenAI documents as "or null": null is the default, as when left out.
NULL_MEANS_DEFAULT = ("output_format",)


class ImageGenerationRequestBase(SamplerNames):
    """Base of the settings-specific request model that `generation_request_model()` builds."""

    model_config = ConfigDict(extra="forbid")

    size: StrictStr | None = Field(
        None,
        pattern=r"^(auto|[0-9]{1,6}x[0-9]{1,6})$",
        description="`WIDTHxHEIGHT` in pixels (e.g. `512x512`), each a multiple of 8 within the "
        "configured bounds, or `auto` (or absent): the chosen model's native size.",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None,
        description="`url` (default): an absolute URL of the image file on this server (send the same "
        "`Authorization` header to fetch it); `b64_json`: the file itself (`output_format`), base64-encoded.",
    )
    user: StrictStr | None = Field(
        None, max_length=USER_MAX_CHARS, description="End-user id (accepted, not stored)."
    )
    quality: Literal["standard", "hd", "auto", "low", "medium", "high"] | None = Field(
        None, description="Accepted for compatibility and ignored (use `steps`)."
    )
    style: Literal["vivid", "natural"] | None = Field(
        None, description="Accepted for compatibility and ignored."
    )

    def size_pixels(self) -> tuple[int, int] | None:
        """(width, height) from `size`; None for `auto` or absent (the model's native size)."""
        if self.size is None or self.size == "auto":
            return None
        match = SIZE_PATTERN.match(self.size)
        assert match is not None  # the field's pattern let it through
        return int(match["width"]), int(match["height"])


@lru_cache(maxsize=8)
def generation_request_model(settings: Settings) -> type[ImageGenerationRequestBase]:
    """The POST /v1/images/generations body for `settings`: OpenAI's fields plus txt2img's extras."""
    txt2img_fields = request_model(settings).model_fields
    fields: dict[str, Any] = {
        name: (txt2img_fields[name].annotation, txt2img_fields[name]) for name in SHARED_FIELDS
    }
    for name in NULL_MEANS_DEFAULT:
        fields[name] = (txt2img_fields[name].annotation | None, txt2img_fields[name])
    for name, source in RENAMED_FIELDS.items():
        # OpenAI documents `n` as "integer or null": null (what its SDK sends for n=None) is the default
        fields[name] = (txt2img_fields[source].annotation | None, txt2img_fields[source])
    examples = [
        {"prompt": PROMPT_EXAMPLE, "n": 2, "size": "512x512", "response_format": "b64_json"},
        {
            "prompt": PROMPT_EXAMPLE,
            "size": f"{settings.min_size}x{settings.min_size}",
            "negative_prompt": "blurry",
            "steps": 20,
            "guidance_scale": 7.5,
            "seed": 1234,
        },
    ]

    class WithExamples(ImageGenerationRequestBase):
        # "allOf": each sampler with the schedulers it can follow (schemas/samplers.py)
        model_config = ConfigDict(
            json_schema_extra={"examples": examples, "allOf": [*pair_rules(), *output_rules()]}
        )

    return create_model("ImageGenerationRequest", __base__=WithExamples, **fields)


# POST /v1/images/edits: beyond the generation's fields, the image settings it takes as extras (OpenAI has
# none: its `mask` alone says what to redraw)
EDIT_FIELDS = ("strength", "mask_blur")


@lru_cache(maxsize=8)
def edit_request_model(settings: Settings) -> type[ImageGenerationRequestBase]:
    """The POST /v1/images/edits form's fields but its files (`image`, `mask`): the generation request's
    plus EDIT_FIELDS, as Generation declares them."""
    return create_model(
        "ImageEditRequest", __base__=generation_request_model(settings), **derive_fields(names=EDIT_FIELDS)
    )


class ImageData(BaseModel):
    """One image: `b64_json` or `url` (as asked), and, beyond OpenAI's fields, its seed."""

    b64_json: str | None = Field(
        None, description="The image file (`output_format`), base64-encoded (response_format b64_json)."
    )
    url: str | None = Field(None, description="Absolute URL of the image file (response_format url).")
    seed: int = Field(description="The seed of this image (request seed + index); not in OpenAI's API.")


class ImagesResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "created": 1735732800,
                    "data": [{"url": "http://127.0.0.1:8000/v1/jobs/3f2c/images/0.png", "seed": 1234}],
                }
            ]
        }
    )

    created: int = Field(description="Unix time (s) of the answer.")
    data: list[ImageData]


MODEL_EXAMPLE = {
    "id": "stable-diffusion-v1-5",
    "object": "model",
    "created": 1735732800,
    "owned_by": "sdserve",
    "native_width": 512,
    "native_height": 512,
    "family": "sd",
    "workers": 2,
    "default": True,
    "size_multiple": 8,
    "default_steps": 20,
    "default_guidance_scale": 7.5,
    "default_sampler": "ddim",
    "default_scheduler": "normal",
    "samplers": ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "lcm"],
}


class ModelObject(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [MODEL_EXAMPLE]})

    id: str = Field(description="The model's name (SD_MODEL_NAME of its workers).")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time (s) the oldest live worker serving it started.")
    owned_by: str = "sdserve"
    native_width: int = Field(description="Default width in pixels (not in OpenAI's API).")
    native_height: int = Field(description="Default height in pixels (not in OpenAI's API).")
    family: str = Field(
        "sd", description="The model's family: `sd` (SD 1.x/2.x) or `sdxl` (not in OpenAI's API)."
    )
    workers: int = Field(1, description="Live workers serving it (not in OpenAI's API).")
    default: bool = Field(
        False, description="Requests that name no model get this one (SD_DEFAULT_MODEL, or the only one)."
    )
    size_multiple: int = Field(SIZE_MULTIPLE, description="Width and height are multiples of this.")
    default_steps: int = Field(
        description="Steps a request gets when it leaves them out (not in OpenAI's API)."
    )
    default_guidance_scale: float = Field(description="Guidance a request gets when it leaves it out.")
    default_sampler: str = Field("ddim", description="Sampler a request gets when it leaves it out.")
    default_scheduler: str = Field("normal", description="Scheduler it gets with that sampler.")
    samplers: list[str] = Field(
        default_factory=list, description="Samplers its workers run (GET /v1/samplers describes them)."
    )


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [MODEL_EXAMPLE]}]})

    object: Literal["list"] = "list"
    data: list[ModelObject] = Field(description="Models served by live workers; empty while none is alive.")


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong; names the field and its allowed range.")
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The request field at fault, if any.")
    code: str | None = Field(description="A stable machine-readable reason, if any.")


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail
