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

from typing import Annotated, Any, Literal

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

from schemas.loras import LORAS_LIMIT, LoraRef, PromptTagError, split_prompt_tags
from schemas.model_names import MODEL_NAME_MAX_CHARS, MODEL_NAME_PATTERN, MODEL_NAME_RULE, is_model_name
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

# The file each image is stored as (OpenAI's `output_format` values) and its compression (OpenAI's
# `output_compression`: 0-100, the higher the better the picture and the bigger the file).
OutputFormat = Literal["png", "jpeg", "webp"]
OUTPUT_FORMATS: tuple[str, ...] = OutputFormat.__args__
DEFAULT_OUTPUT_COMPRESSION = 100  # OpenAI's default


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


def _compression_needs_a_lossy_format(compression: int | None, info: ValidationInfo) -> int | None:
    """`output_compression` means something for jpeg and webp only: with png it is an error, never
    silently ignored (output_format is validated first)."""
    output_format = info.data.get("output_format")
    if compression is not None and output_format == "png":
        raise PydanticCustomError(
            "compression_without_lossy_format",
            "output_compression applies to output_format jpeg or webp, not png (send output_format too)",
        )
    return compression


def output_rules() -> list[dict]:
    """JSON Schema rules (`allOf` items) for what one field cannot say alone: `output_compression`
    (not null) only with `output_format` jpeg or webp."""
    lossy = [name for name in OUTPUT_FORMATS if name != "png"]
    return [
        {
            "if": {
                "properties": {"output_compression": {"type": "integer"}},
                "required": ["output_compression"],
            },
            "then": {"properties": {"output_format": {"enum": lossy}}, "required": ["output_format"]},
        }
    ]


def _model_name(value: str) -> str:
    """A model's name, never a path (schemas/model_names.py)."""
    if not is_model_name(value):
        raise PydanticCustomError(
            "model_name",
            "Input should be a model name: {rule} (got {length} characters)",
            {"rule": MODEL_NAME_RULE, "length": len(value)},
        )
    return value


# A model's name as requests send it; the schema shows the rule (the check gives the message).
ModelName = Annotated[
    str,
    Field(strict=True, json_schema_extra={"pattern": MODEL_NAME_PATTERN, "maxLength": MODEL_NAME_MAX_CHARS}),
    AfterValidator(_model_name),
]


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

# SDXL's size conditioning ("micro-conditioning"), as diffusers' StableDiffusionXLPipeline names it:
# pairs in pixels, (height, width) and (top, left); a model of another family refuses them.
SDXL_FIELDS = ("original_size", "crops_coords_top_left", "target_size")
SizeCondition = tuple[json_int(ge=1, le=SIZE_LIMIT), json_int(ge=1, le=SIZE_LIMIT)]
CropCondition = tuple[json_int(ge=0, le=SIZE_LIMIT), json_int(ge=0, le=SIZE_LIMIT)]

# img2img and inpainting: input images travel by NAME. The API stores each uploaded file (PNG, JPEG or
# WebP, as uploaded) in Redis under schemas/redis_keys.py `input_image_key(name)` with a TTL; the job
# carries only the name, and the worker fetches, decodes and fits it (workers/job_function.py).
INPUT_IMAGE_NAME_PATTERN = r"^[0-9A-Za-z_-]{1,128}$"
InputImageName = Annotated[str, Field(strict=True, pattern=INPUT_IMAGE_NAME_PATTERN)]
# how an input image is fitted to width x height (models/image_inputs.py: fit_image): diffusers'
# VaeImageProcessor resize modes "default", "crop", "fill", AUTOMATIC1111's "Just resize", "Crop and
# resize", "Resize and fill"
ResizeMode = Literal["resize", "crop", "fill"]
RESIZE_MODES: tuple[str, ...] = ResizeMode.__args__
DEFAULT_STRENGTH = 0.8  # diffusers' StableDiffusionImg2ImgPipeline default
DEFAULT_MASK_BLUR = 4  # pixels, AUTOMATIC1111's default
MASK_BLUR_MAX = 64
# The fields of img2img and inpainting: a text-to-image request has none of them (service/api_models.py)
IMAGE_FIELDS = ("init_image", "mask_image", "strength", "mask_blur", "resize_mode")


def denoising_steps(steps: int, strength: float) -> int:
    """The steps an img2img request runs, as diffusers computes them: `min(int(steps * strength), steps)`
    (its `init_timestep`); the run starts at step `steps - denoising_steps(...)` of the schedule."""
    return min(int(steps * strength), steps)


def _mask_needs_init_image(mask: str | None, info: ValidationInfo) -> str | None:
    """A mask says what to repaint of init_image: without one it means nothing (init_image is
    validated first; when it failed, that error is the one to report)."""
    if mask is not None and "init_image" in info.data and info.data["init_image"] is None:
        raise PydanticCustomError(
            "mask_without_init_image", "mask_image needs init_image (the image to repaint)"
        )
    return mask


def _strength_runs_a_step(strength: float, info: ValidationInfo) -> float:
    """With an init image, the share of the schedule run must hold at least one step (steps and
    init_image are validated first)."""
    steps = info.data.get("steps")
    if (
        info.data.get("init_image") is not None
        and isinstance(steps, int)
        and denoising_steps(steps, strength) < 1
    ):
        raise PydanticCustomError(
            "strength_runs_no_step",
            "Input should be at least 1/steps = {minimum} with steps={steps}: strength {strength} runs "
            "int(steps * strength) = 0 denoising steps",
            {"minimum": f"{1 / steps:.4g}", "steps": steps, "strength": strength},
        )
    return strength


def _distinct_loras(loras: tuple[LoraRef, ...]) -> tuple[LoraRef, ...]:
    """A LoRA named twice (in `loras` and a prompt tag, or twice in either) is a mistake, never summed."""
    seen: set[str] = set()
    for ref in loras:
        if ref.name in seen:
            raise PydanticCustomError(
                "lora_repeated",
                "LoRA '{name}' is named twice (in loras or as a <lora:...> tag in the prompt): name it once",
                {"name": ref.name},
            )
        seen.add(ref.name)
    return loras


class Generation(SamplerNames):
    """What to generate: `num_images` pictures of one prompt, image i with seed `seed + i`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _lora_tags_out_of_the_prompt(cls, data: Any) -> Any:
        """AUTOMATIC1111's `<lora:name:weight>` tags leave the prompt and join `loras` (after the ones
        sent there), as AUTOMATIC1111 reads them (schemas/loras.py: split_prompt_tags)."""
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("prompt"), str)
            or "<lora:" not in data["prompt"]
        ):
            return data
        try:
            prompt, tags = split_prompt_tags(data["prompt"])
        except PromptTagError as error:
            raise PydanticCustomError("lora_tag", str(error)) from None
        loras = data.get("loras") or []
        if not isinstance(loras, (list, tuple)):
            return data  # the field reports it
        return {**data, "prompt": prompt, "loras": [*loras, *tags]}

    # may be empty here (an unconditional picture); the API asks for a prompt (NonBlank below)
    prompt: Annotated[str, Field(strict=True)] = Field(
        max_length=PROMPT_CHARS_LIMIT, description="What to draw."
    )
    negative_prompt: Annotated[str, Field(strict=True)] = Field(
        "", max_length=PROMPT_CHARS_LIMIT, description="What to steer away from (replaces the empty prompt)."
    )
    model: ModelName | None = Field(
        None,
        description="The model to draw with: one that GET /v1/models lists (each worker serves one model; "
        "a job runs on a worker of the model it names).",
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
    output_format: OutputFormat = Field(
        "png",
        description="File format of the images: png (lossless, A1111 parameters in a text chunk), jpeg or "
        "webp (lossy, parameters in the EXIF UserComment, as AUTOMATIC1111 writes them).",
    )
    # after output_format: its check reads it
    output_compression: Annotated[
        json_int(ge=0, le=100) | None, AfterValidator(_compression_needs_a_lossy_format)
    ] = Field(
        None,
        description="jpeg and webp only: compression level as OpenAI's API names it, 0-100, the encoder's "
        f"quality (100: the best picture, the biggest file). Null or absent: {DEFAULT_OUTPUT_COMPRESSION}.",
    )

    # a tuple: a Generation stays hashable (frozen), e.g. to key plans and benchmark runs by it
    loras: Annotated[tuple[LoraRef, ...], AfterValidator(_distinct_loras)] = Field(
        (),
        max_length=LORAS_LIMIT,
        description="LoRAs to apply, each with its weight: names GET /v1/loras lists. AUTOMATIC1111's "
        "<lora:name:weight> tags in the prompt are read too (and taken out of its text). Each applies to "
        "this request's prompt encoding and its own rows of the shared UNet calls only.",
    )

    # SDXL only (SDXL_FIELDS); null or absent: diffusers' defaults
    original_size: SizeCondition | None = Field(
        None,
        description="SDXL only: [height, width] in pixels the picture should look as if it was taken at "
        "(SDXL's size conditioning). Null or absent: [height, width] of the request, as diffusers.",
    )
    crops_coords_top_left: CropCondition | None = Field(
        None,
        description="SDXL only: [top, left] in pixels of the crop the picture should look as if it was "
        "cut from. Null or absent: [0, 0] (uncropped), as diffusers.",
    )
    target_size: SizeCondition | None = Field(
        None,
        description="SDXL only: [height, width] in pixels SDXL is told the picture is meant for. Null or "
        "absent: [height, width] of the request, as diffusers.",
    )

    # img2img and inpainting (null init_image: text-to-image); after steps: strength's check reads it
    init_image: InputImageName | None = Field(
        None,
        description="img2img and inpainting: the name of a stored input image (PNG, JPEG or WebP) to start "
        "from instead of pure noise, fitted to width x height by resize_mode. Null or absent: text-to-image.",
    )
    mask_image: Annotated[InputImageName | None, AfterValidator(_mask_needs_init_image)] = Field(
        None,
        description="Inpainting: the name of a stored mask image, the size of init_image: white is repainted, "
        "black kept (as grayscale, blurred by mask_blur, then binarized at 0.5). Needs init_image.",
    )
    strength: Annotated[json_float(ge=0, le=1), AfterValidator(_strength_runs_a_step)] = Field(
        DEFAULT_STRENGTH,
        description="img2img and inpainting: the share of the schedule that is run, 0 to 1 (diffusers' "
        "strength, AUTOMATIC1111's denoising strength): the image is noised to step steps - int(steps * "
        "strength) and denoised from there, so int(steps * strength) steps run (at least 1); 1 starts from "
        "(almost) pure noise. Ignored without init_image.",
    )
    mask_blur: json_int(ge=0, le=MASK_BLUR_MAX) = Field(
        DEFAULT_MASK_BLUR,
        description="Inpainting: radius in pixels of the Gaussian blur applied to the mask once fitted to "
        "width x height, before it is binarized at 0.5 (diffusers' VaeImageProcessor.blur); 0: none. "
        "Ignored without mask_image.",
    )
    resize_mode: ResizeMode = Field(
        "resize",
        description="How init_image and mask_image are fitted to width x height: resize (stretched, Lanczos), "
        "crop (scaled to cover, centred, the excess cut) or fill (scaled to fit, centred, the borders filled "
        "by stretching the image's edges): AUTOMATIC1111's Just resize, Crop and resize, Resize and fill.",
    )

    @property
    def guided(self) -> bool:
        """Classifier-free guidance needs an unconditional pass only when the scale is > 1."""
        return self.guidance_scale > 1.0

    @property
    def image_quality(self) -> int:
        """The encoder's quality for jpeg and webp (output_compression, or its default)."""
        if self.output_compression is None:
            return DEFAULT_OUTPUT_COMPRESSION
        return self.output_compression

    @property
    def steps_to_run(self) -> int:
        """The denoising steps this request runs: all of them for text-to-image, int(steps * strength)
        for img2img and inpainting (what progress counts to)."""
        return self.steps if self.init_image is None else denoising_steps(self.steps, self.strength)

    @property
    def first_step(self) -> int:
        """The step of the schedule the run starts at (diffusers' `t_start`): 0 for text-to-image."""
        return self.steps - self.steps_to_run

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
