"""From a validated request to the GenerationParams a worker runs: defaults, seed, cross-field checks."""

from __future__ import annotations

import secrets

from schemas.queue import SEED_MAX, GenerationParams
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


def resolve_params(
    request: Txt2ImgRequestBase, settings: Settings, worker: WorkerInfo | None
) -> GenerationParams:
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

    seed = request.seed
    if seed is not None and seed + request.num_images - 1 > SEED_MAX:
        # the last image's seed would not fit in 32 bits: a seed a client could not send back
        raise validation_error(
            "seed",
            f"Input should be at most {SEED_MAX - request.num_images + 1} with num_images={request.num_images} "
            f"(image i uses seed + i, which must stay <= {SEED_MAX})",
            "less_than_equal",
        )
    if seed is None:
        # Leave room so that every image's seed (seed + index) stays within 32 bits.
        seed = secrets.randbelow(SEED_MAX - request.num_images + 2)
    default_steps, default_guidance_scale = sampling_defaults(settings, worker)
    return GenerationParams(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        steps=request.steps if "steps" in given else default_steps,
        guidance_scale=request.guidance_scale if "guidance_scale" in given else default_guidance_scale,
        eta=request.eta,
        seed=seed,
        num_images=request.num_images,
        preview=request.preview,
    )
