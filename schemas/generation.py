"""The one description of a generation: every field, its bounds, its default and its meaning, once.

`Generation` is a fully resolved request, as a worker runs it and as `models/` consumes it. The
API's request models (ours, OpenAI's) are derived from its fields (`derive_fields`): they make some
fields optional (the server fills them in) and tighten some bounds to the deployment's settings,
but never declare a field again. Limits that depend on the loaded model (the VAE's size multiple,
the schedule's longest run, the text encoder's token limit) are checked once, on the worker,
against that model (models/pipeline.py: `check_generation`).

Depends on pydantic only: the API image has no torch.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from schemas.samplers import (
    DEFAULT_SAMPLER,
    DEFAULT_SCHEDULER,
    SAMPLERS,
    SCHEDULERS,
    UnknownName,
    check_pair,
    resolve_sampler,
    resolve_scheduler,
    sampler_labels,
    sampler_spellings,
    scheduler_spellings,
)

# Hard limits: a deployment's settings may tighten them (service/settings.py), never widen them.
SEED_MAX = 2**32 - 1  # seeds are 32-bit, as in AUTOMATIC1111 and diffusers' examples
STEPS_MAX = 150
GUIDANCE_SCALE_MAX = 30.0
SIZE_MULTIPLE = 8  # the VAE of every supported model downsamples by 8
SIZE_LIMIT = 16_384  # pixels per side
NUM_IMAGES_LIMIT = 64
PROMPT_CHARS_LIMIT = 100_000

# Defaults for a model that recommends none (its defaults.json; the API's SD_DEFAULT_* settings
# start from these).
DEFAULT_WIDTH = DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5

PROMPT_EXAMPLE = "a red circle in the top left on a blue background"  # what the embedded model draws


def _integral_float_to_int(value: object) -> object:
    """JSON Schema counts 6.0 as an integer: take it as 6. 5.5, "5" and true stay type errors."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(**constraints: Any) -> Any:
    """A strict integer as JSON sees one (6.0 counts; 5.5, "5" and true do not), within `constraints`.

    The constraints come before the BeforeValidator: the other way round, pydantic writes them into
    the JSON schema as raw `ge`/`le` keys that no client understands.
    """
    return Annotated[int, Field(strict=True, **constraints), BeforeValidator(_integral_float_to_int)]


def json_float(**constraints: Any) -> Any:
    """A strict finite number (no strings, no booleans, no NaN or infinity), within `constraints`."""
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **constraints)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError(
            "string_blank", "String should contain at least one non-whitespace character"
        )
    return value


# A prompt a client must send: at least one non-whitespace character (the API's rule).
NonBlank = Annotated[
    str, Field(min_length=1, json_schema_extra={"pattern": r"\S"}), AfterValidator(_not_blank)
]


def _last_seed_fits(seed: int | None, info: ValidationInfo) -> int | None:
    """Image i uses seed + i: the last image's seed must fit too (num_images is validated first)."""
    num_images = info.data.get("num_images") or 1
    if seed is not None and seed + num_images - 1 > SEED_MAX:
        raise PydanticCustomError(
            "less_than_equal",
            "Input should be at most {limit} with num_images={num_images} (image i uses seed + i, "
            "which must stay <= {seed_max})",
            {"limit": SEED_MAX - num_images + 1, "num_images": num_images, "seed_max": SEED_MAX},
        )
    return seed


class _ImpliedSchedulerConflict:
    """A combined sampler name ("DPM++ 2M Karras") sent with another scheduler: reported on `sampler`."""

    def __init__(self, message: str) -> None:
        self.message = message


def _sampler_name(value: object) -> object:
    """A canonical sampler name from a name or an alias; the error lists the valid ones."""
    if isinstance(value, _ImpliedSchedulerConflict):
        raise PydanticCustomError("sampler_scheduler_conflict", value.message)
    if not isinstance(value, str):
        return value  # the str type reports it
    try:
        return resolve_sampler(value)[0]
    except UnknownName as error:
        raise PydanticCustomError("unknown_sampler", str(error)) from None


def _scheduler_name(value: object, info: ValidationInfo) -> object:
    """A canonical scheduler name that the (already validated) sampler can follow."""
    if not isinstance(value, str):
        return value
    try:
        scheduler = resolve_scheduler(value)
        sampler = info.data.get("sampler")
        if isinstance(sampler, str):
            check_pair(sampler, scheduler)
    except UnknownName as error:
        raise PydanticCustomError("unknown_scheduler", str(error)) from None
    return scheduler


class SamplerNames(BaseModel):
    """Splits AUTOMATIC1111's combined names ("DPM++ 2M Karras") into sampler and scheduler, for
    Generation and for every request model derived from it."""

    @model_validator(mode="before")
    @classmethod
    def _split_combined_sampler_name(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("sampler"), str):
            return data
        try:
            sampler, implied = resolve_sampler(data["sampler"])
        except UnknownName:
            return data  # the field reports it
        if implied is None:
            return data
        given = data.get("scheduler")
        if given is None:
            return {**data, "sampler": sampler, "scheduler": implied}
        try:
            same = isinstance(given, str) and resolve_scheduler(given) == implied
        except UnknownName:
            same = False
        if same:
            return {**data, "sampler": sampler}
        conflict = _ImpliedSchedulerConflict(
            f"{data['sampler']!r} means sampler {sampler} with scheduler {implied}, but scheduler is "
            f"{given!r}: send sampler {sampler!r} with the scheduler you want"
        )
        return {**data, "sampler": conflict}


Size = json_int(ge=SIZE_MULTIPLE, le=SIZE_LIMIT, multiple_of=SIZE_MULTIPLE)


class Generation(SamplerNames):
    """What to generate: `num_images` pictures of one prompt, image i with seed `seed + i`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # may be empty here (an unconditional picture); the API asks for a prompt (NonBlank below)
    prompt: Annotated[str, Field(strict=True)] = Field(
        max_length=PROMPT_CHARS_LIMIT, description="What to draw."
    )
    negative_prompt: Annotated[str, Field(strict=True)] = Field(
        "", max_length=PROMPT_CHARS_LIMIT, description="What to steer away from (replaces the empty prompt)."
    )
    width: Size = Field(DEFAULT_WIDTH, description=f"Pixels, a multiple of {SIZE_MULTIPLE}.")
    height: Size = Field(DEFAULT_HEIGHT, description=f"Pixels, a multiple of {SIZE_MULTIPLE}.")
    steps: json_int(ge=1, le=STEPS_MAX) = Field(
        DEFAULT_STEPS, description=f"Denoising steps, 1 to {STEPS_MAX}."
    )
    guidance_scale: json_float(ge=0, le=GUIDANCE_SCALE_MAX) = Field(
        DEFAULT_GUIDANCE_SCALE,
        description=f"Classifier-free guidance, 0 to {GUIDANCE_SCALE_MAX:g} (<= 1: no unconditional pass).",
    )
    eta: json_float(ge=0, le=1) = Field(
        0.0, description="DDIM's eta, 0 (deterministic) to 1; samplers other than ddim accept and ignore it."
    )
    sampler: Annotated[str, BeforeValidator(_sampler_name), Field(strict=True)] = Field(
        DEFAULT_SAMPLER,
        json_schema_extra={"enum": sampler_spellings()},
        description=f"One of {', '.join(SAMPLERS)}, or AUTOMATIC1111's names ({sampler_labels()}, and "
        'combined ones such as "DPM++ 2M Karras"). GET /v1/samplers lists them.',
    )
    scheduler: Annotated[str, BeforeValidator(_scheduler_name), Field(strict=True)] = Field(
        DEFAULT_SCHEDULER,
        json_schema_extra={"enum": scheduler_spellings()},
        description=f"How the steps are spread over the noise levels: {', '.join(SCHEDULERS)} "
        "(each sampler supports some; GET /v1/samplers).",
    )
    num_images: json_int(ge=1, le=NUM_IMAGES_LIMIT) = Field(1, description="Pictures of this prompt.")
    # after num_images: the seed's check reads it
    seed: Annotated[json_int(ge=0, le=SEED_MAX), AfterValidator(_last_seed_fits)] = Field(
        0, description=f"0 to {SEED_MAX}. Image i uses seed + i, which must stay <= {SEED_MAX}."
    )
    preview: Annotated[bool, Field(strict=True)] = Field(
        False,
        description="While the job runs, publish a cheap low-resolution preview of the first image "
        "(`preview_url` of GET /v1/jobs/{id}).",
    )

    @property
    def guided(self) -> bool:
        """Classifier-free guidance needs an unconditional pass only when the scale is > 1."""
        return self.guidance_scale > 1.0

    def image_seeds(self) -> list[int]:
        """Image i of a request with seed s uses seed s + i (DESIGN.md): the one place that says so."""
        return [self.seed + i for i in range(self.num_images)]


def derive_fields(
    names: tuple[str, ...] | None = None,
    nullable: tuple[str, ...] = (),
    omittable: tuple[str, ...] = (),
    bounds: dict[str, dict[str, Any]] | None = None,
) -> dict[str, tuple[Any, FieldInfo]]:
    """`Generation`'s fields for another request model (`create_model(..., **fields)`).

    `nullable`: fields that become `T | None = None` (null or absent: the server fills them in);
    `omittable`: fields the server fills in when absent, but that may not be null; `bounds`: tighter
    constraints per field (e.g. {"width": {"le": 1024}}). Descriptions, types, checks and the other
    constraints stay Generation's.
    """
    fields: dict[str, tuple[Any, FieldInfo]] = {}
    for name, info in Generation.model_fields.items():
        if names is not None and name not in names:
            continue
        overrides: dict[str, Any] = dict((bounds or {}).get(name, {}))
        annotation: Any = info.annotation
        if name in nullable or name in omittable:
            overrides["default"] = None  # defaults are not validated: None means "left out"
        if name in nullable:
            annotation = annotation | None
        merged = FieldInfo.merge_field_infos(info, Field(**overrides)) if overrides else info
        fields[name] = (annotation, merged)
    return fields
