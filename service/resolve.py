"""From a validated request to the Generation a worker of its model runs: that model's defaults and
limits (what its workers publish), the seed, cross-field checks."""

from __future__ import annotations

import contextlib
import secrets

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from schemas.generation import SEED_MAX, Generation
from schemas.input_images import default_size
from schemas.samplers import (
    DEFAULT_SAMPLER,
    DEFAULT_SCHEDULER,
    SAMPLERS,
    UnknownName,
    resolve_sampler,
    resolve_scheduler,
)
from schemas.worker_info import WorkerInfo
from service.api_models import DELIVERY_FIELDS, Txt2ImgRequestBase
from service.errors import validation_error
from service.settings import Settings


def sampling_defaults(settings: Settings, worker: WorkerInfo | None) -> tuple[int, float]:
    """(steps, guidance_scale) for a request that leaves them out: what the served model recommends,
    else SD_DEFAULT_STEPS / SD_DEFAULT_GUIDANCE_SCALE."""
    steps = worker.default_steps if worker and worker.default_steps else settings.default_steps
    guidance_scale = (
        worker.default_guidance_scale
        if worker and worker.default_guidance_scale is not None
        else settings.default_guidance_scale
    )
    return steps, guidance_scale


def check_default_sampler(sampler: str, scheduler: str | None) -> None:
    """A scheduler sent without a sampler must suit the default sampler (422 naming those it suits)."""
    if scheduler is None:
        return
    try:
        wanted = resolve_scheduler(scheduler)
    except UnknownName:
        return  # Generation names the valid ones
    if wanted not in SAMPLERS[sampler].schedulers:
        able = [name for name, info in SAMPLERS.items() if wanted in info.schedulers]
        raise validation_error(
            "scheduler",
            f"scheduler {scheduler!r} needs a sampler that can follow it (the default, {sampler}, cannot): "
            f"send `sampler`, one of {', '.join(able)}",
            "sampler_required",
        )


def recommended_scheduler(sampler: str, worker: WorkerInfo | None) -> str:
    """The scheduler the served model recommends if `sampler` (a name or alias) can follow it, else
    the default."""
    recommended = worker.default_scheduler if worker else None
    try:
        canonical = resolve_sampler(sampler)[0]
    except UnknownName:
        return DEFAULT_SCHEDULER  # Generation reports the sampler
    if recommended and recommended in SAMPLERS[canonical].schedulers:
        return recommended
    return DEFAULT_SCHEDULER


def check_sampler(sampler: str, worker: WorkerInfo) -> None:
    """The chosen model's workers must run the sampler (a 422 naming those they run)."""
    if worker.samplers and sampler not in worker.samplers:
        raise validation_error(
            "sampler",
            f"model {worker.model} does not run sampler {sampler}: its samplers are {', '.join(worker.samplers)}",
            "unsupported_sampler",
        )


def resolve_params(
    request: Txt2ImgRequestBase,
    settings: Settings,
    worker: WorkerInfo,
    image_size: tuple[int, int] | None = None,
) -> Generation:
    """The Generation of `request` on the model `worker` serves (its chosen model's newest live worker:
    service/model_routing.py): width/height (and steps, guidance, sampler when the model recommends
    them) from that model, a seed, and the checks that need more than one field or the model's limits
    (size multiple, samplers); a violation is a 422 naming the field. With an init image of
    `image_size` (width, height), the size left out is the image's (schemas/input_images.py:
    default_size, within the deployment's limits) rather than the model's native one."""
    given = request.model_dump(exclude_unset=True)
    if image_size is None:
        native_width, native_height = worker.native_width, worker.native_height
    else:
        native_width, native_height = default_size(
            *image_size, worker.size_multiple, settings.max_size, settings.max_pixels, settings.min_size
        )
    width = request.width if request.width is not None else native_width
    height = request.height if request.height is not None else native_height

    if worker.size_multiple > 1:
        for name, value in (("width", width), ("height", height)):
            if name in given and value % worker.size_multiple:
                raise validation_error(
                    name,
                    f"Input should be a multiple of {worker.size_multiple} for model {worker.model}",
                    "multiple_of",
                )
    pixels = width * height
    user_sized = [name for name in ("height", "width") if given.get(name) is not None]
    # The model's own native size is trusted; the limit guards sizes a client chose.
    if user_sized and pixels > settings.max_pixels:
        raise validation_error(
            user_sized[0],
            f"width x height should be at most {settings.max_pixels} pixels (got {width} x {height} = {pixels})",
            "too_many_pixels",
        )

    values = request.model_dump(exclude_none=True, exclude=set(DELIVERY_FIELDS))
    if "seed" not in values:
        # room for every image's seed (seed + index) within SEED_MAX
        values["seed"] = secrets.randbelow(SEED_MAX - request.num_images + 2)
    values["model"] = worker.model
    default_steps, default_guidance_scale = sampling_defaults(settings, worker)
    values.setdefault("steps", default_steps)
    values.setdefault("guidance_scale", default_guidance_scale)
    if "sampler" not in values:
        values["sampler"] = worker.default_sampler or DEFAULT_SAMPLER
        check_default_sampler(values["sampler"], values.get("scheduler"))
    with contextlib.suppress(UnknownName):  # Generation names the valid ones
        check_sampler(resolve_sampler(values["sampler"])[0], worker)
    if "scheduler" not in values:
        values["scheduler"] = recommended_scheduler(values["sampler"], worker)
    values["width"], values["height"] = width, height
    try:
        generation = Generation.model_validate(values)
    except ValidationError as error:  # a rule across fields (the seed of the last image)
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        ) from None
    check_loras(generation, settings, worker)
    return generation


def check_loras(generation: Generation, settings: Settings, worker: WorkerInfo) -> None:
    """The request's LoRAs (its `loras` and its prompt's <lora:...> tags, Generation has them all) must
    be ones the chosen model's workers list as usable, and at most SD_MAX_LORAS_PER_REQUEST of them (a
    422 at `loras` saying where to look)."""
    if not generation.loras:
        return
    if worker.max_loras_per_request == 0:
        raise validation_error(
            "loras",
            f"model {worker.model} serves no LoRAs (its workers have no SD_LORA_DIR)",
            "loras_not_served",
        )
    limit = min(settings.max_loras_per_request, worker.max_loras_per_request)
    if len(generation.loras) > limit:
        raise validation_error(
            "loras",
            f"at most {limit} LoRAs per request (counting <lora:...> prompt tags), got {len(generation.loras)}",
            "too_long",
        )
    listed = {info.name: info for info in worker.loras}
    for index, ref in enumerate(generation.loras):
        info = listed.get(ref.name)
        if info is None:
            raise RequestValidationError(
                [
                    {
                        "loc": ("body", "loras", index, "name"),
                        "msg": f"no LoRA named {ref.name!r} for model {worker.model}; GET /v1/loras lists them",
                        "type": "unknown_lora",
                    }
                ]
            )
        if not info.usable:
            raise RequestValidationError(
                [
                    {
                        "loc": ("body", "loras", index, "name"),
                        "msg": f"LoRA {ref.name!r} cannot be applied to model {worker.model} "
                        f"({worker.family}): {info.problem}",
                        "type": "unusable_lora",
                    }
                ]
            )
