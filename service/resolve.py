"""From a validated request to the Generation a worker runs: defaults, seed, cross-field checks."""

from __future__ import annotations

import secrets

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from schemas.generation import SEED_MAX, Generation
from schemas.samplers import (
    DEFAULT_SAMPLER,
    DEFAULT_SCHEDULER,
    SAMPLERS,
    UnknownName,
    resolve_sampler,
    resolve_scheduler,
)
from schemas.worker_info import WorkerInfo
from service.api_models import Txt2ImgRequestBase
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


def resolve_params(request: Txt2ImgRequestBase, settings: Settings, worker: WorkerInfo | None) -> Generation:
    """Fill width/height (and steps/guidance when the model recommends them) from the served model
    (or the fallbacks while none is alive), pick a seed, and check what needs more than one field;
    a violation is a 422 naming the field."""
    given = request.model_dump(exclude_unset=True)
    native_w, native_h = (
        (worker.native_width, worker.native_height)
        if worker
        else (settings.fallback_width, settings.fallback_height)
    )
    width = request.width if request.width is not None else native_w
    height = request.height if request.height is not None else native_h

    if worker is not None and worker.size_multiple > 1:
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

    values = request.model_dump(exclude_none=True)
    if "seed" not in values:
        # room for every image's seed (seed + index) within SEED_MAX
        values["seed"] = secrets.randbelow(SEED_MAX - request.num_images + 2)
    default_steps, default_guidance_scale = sampling_defaults(settings, worker)
    values.setdefault("steps", default_steps)
    values.setdefault("guidance_scale", default_guidance_scale)
    if "sampler" not in values:
        values["sampler"] = worker.default_sampler if worker and worker.default_sampler else DEFAULT_SAMPLER
        check_default_sampler(values["sampler"], values.get("scheduler"))
    if "scheduler" not in values:
        values["scheduler"] = recommended_scheduler(values["sampler"], worker)
    values["width"], values["height"] = width, height
    try:
        return Generation.model_validate(values)
    except ValidationError as error:  # a rule across fields (the seed of the last image)
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        ) from None
