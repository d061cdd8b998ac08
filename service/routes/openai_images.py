"""OpenAI-compatible routes: POST /v1/images/generations, POST /v1/images/edits, GET /v1/models,
GET /v1/models/{id}.

A generation is a normal job: the OpenAI body is translated to a txt2img request, validated by
the txt2img model and queued by `submit_job` (same limits, keys and 429 as POST /v1/txt2img).
The route then waits for it, asynchronously (no thread held), at most SD_OPENAI_WAIT_S seconds.
On timeout the job is CANCELED and the answer is 504: OpenAI's clients retry on their own and
nobody would ever read a late job's images, so letting it run would only lengthen the queue. A
client that hangs up while waiting gets its job canceled too.
"""

# No `from __future__ import annotations`: FastAPI must see the request class built in build_router.

import base64
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from schemas.errors import ErrorType, is_client_fault
from schemas.queue import ImageRef, JobStatus
from schemas.samplers import DEFAULT_SAMPLER, SAMPLERS
from service.api_models import PROMPT_EXAMPLE, Txt2ImgRequestBase, request_model
from service.api_models import edit_request_model as our_edit_request_model
from service.deps import Owner, Services, ServicesDep, get_owner
from service.form_body import read_body
from service.image_jobs import InputFiles, submit_with_images
from service.input_images import alpha_mask, check_image, check_mask_size
from service.job_store import JobConflict, JobSnapshot
from service.job_wait import WaitOutcome, wait_for_job
from service.live_workers import live_workers
from service.model_routing import served_models as group_by_model
from service.openai_errors import (
    INVALID_REQUEST,
    NO_RETRY,
    SERVER_ERROR,
    OpenAIError,
    from_validation_errors,
    openai_route_class,
)
from service.openai_models import (
    EDIT_FIELDS,
    NULL_MEANS_DEFAULT,
    RENAMED_FIELDS,
    SHARED_FIELDS,
    ImageData,
    ImageGenerationRequestBase,
    ImagesResponse,
    ModelList,
    ModelObject,
    OpenAIErrorBody,
    edit_request_model,
    generation_request_model,
)
from service.resolve import recommended_scheduler, sampling_defaults
from service.routes.jobs import count_if_first_seen_finished, image_url
from service.settings import SIZE_MULTIPLE, Settings
from service.submit import submit_job

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's code: the answer has no reader

_ERROR_EXAMPLES: dict[int, tuple[str, str, str, str | None, str | None]] = {
    400: ("Invalid field", "n: Input should be less than or equal to 8", INVALID_REQUEST, "n", None),
    401: ("Missing or invalid API key", "invalid API key", INVALID_REQUEST, None, "invalid_api_key"),
    404: ("Model not served", "model 'x' is not served; served: tiny-sd1", INVALID_REQUEST, "model", "model_not_found"),
    409: ("The job was canceled meanwhile", "the job was canceled before it finished", INVALID_REQUEST, None, "canceled"),
    429: ("Queue full", "the queue is full (100 jobs waiting, limit 100); retry in 10 s", "rate_limit_error", None, "queue_full"),
    502: ("The generation failed", "the generation failed (OutOfMemory): out of memory", SERVER_ERROR, None, "generation_failed"),
    503: ("Redis unreachable", "the job store (Redis) is unreachable; retry later", SERVER_ERROR, None, "service_unavailable"),
    504: ("No result within SD_OPENAI_WAIT_S", "no result within 300 s (queued, 12 jobs ahead); the job was canceled", SERVER_ERROR, None, "timeout"),
}  # fmt: skip


def openai_error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        summary, message, error_type, param, error_code = _ERROR_EXAMPLES[code]
        example = {"error": {"message": message, "type": error_type, "param": param, "code": error_code}}
        responses[code] = {
            "model": OpenAIErrorBody,
            "description": summary,
            "content": {"application/json": {"example": example}},
        }
    return responses


def size_rule(settings: Settings) -> str:
    return (
        f"should be 'WIDTHxHEIGHT' (e.g. '512x512') with each a multiple of {SIZE_MULTIPLE} "
        f"from {settings.min_size} to {settings.max_size} and width x height at most "
        f"{settings.max_pixels}, or 'auto' (the model's native size)"
    )


def to_txt2img(
    body: ImageGenerationRequestBase, settings: Settings, edit: bool = False
) -> Txt2ImgRequestBase:
    """The txt2img request an OpenAI body stands for (`edit`: the request with images that an edit's body
    stands for, its EDIT_FIELDS too), validated by our request model (400 otherwise)."""
    given = body.model_dump(exclude_unset=True)
    for name in NULL_MEANS_DEFAULT:
        if given.get(name, "") is None:
            del given[name]
    names = (*SHARED_FIELDS, *EDIT_FIELDS) if edit else SHARED_FIELDS
    fields: dict[str, Any] = {name: given[name] for name in names if name in given}
    fields |= {source: given[name] for name, source in RENAMED_FIELDS.items() if given.get(name) is not None}
    size = body.size_pixels()
    if size is not None:
        fields["width"], fields["height"] = size
    target = our_edit_request_model(settings) if edit else request_model(settings)
    try:
        return target.model_validate(fields)
    except ValidationError as error:
        raise from_validation_errors(error.errors(), size_rule(settings)) from None


def edit_files(files: dict[str, bytes], settings: Settings) -> InputFiles:
    """An edit's image and the mask the worker reads: OpenAI's mask (its fully transparent pixels are
    where to edit), else the image's own transparent pixels, else none (the whole image is redrawn)."""
    if "image" not in files:
        raise OpenAIError(400, "image: a file is required (the image to edit)", param="image")
    image = check_image(files["image"], "image", settings.max_input_pixels)
    if "mask" in files:
        given = check_image(files["mask"], "mask", settings.max_input_pixels)
        check_mask_size(image, given, "mask")
        return InputFiles(image, alpha_mask(given, "mask"))
    return InputFiles(image, alpha_mask(image, "image", required=False))


@dataclass
class Finished:
    snapshot: JobSnapshot
    images: list[tuple[ImageRef, bytes | None]]  # (the image, its file when asked for)


def finish(services: Services, job_id: str, owner: str, with_bytes: bool) -> Finished:
    """Thread pool: the ended job's snapshot (counted in the metrics once) and its images."""
    store = services.store
    job = store.find(job_id, owner)
    snap = store.snapshot(job)
    count_if_first_seen_finished(services, snap)
    images = []
    if snap.status is JobStatus.SUCCEEDED and snap.result is not None:
        for ref in snap.result.images:
            data = store.image(job, ref.index)[0] if with_bytes else None
            images.append((ref, data))
    return Finished(snap, images)


def cancel_unfinished(services: Services, job_id: str, owner: str) -> JobSnapshot | None:
    """Thread pool: cancel a job still queued or running; None if it ended meanwhile (then use it)."""
    store = services.store
    job = store.find(job_id, owner)
    before = store.snapshot(job)
    try:
        store.cancel(job)
    except JobConflict:
        return None
    return before


def where(snap: JobSnapshot) -> str:
    if snap.status is JobStatus.QUEUED:
        ahead = snap.queue_position
        return "still queued" + (f", {ahead} job(s) ahead" if ahead else "")
    return f"running, at step {snap.step} of {snap.total_steps}"


def failure(snap: JobSnapshot) -> OpenAIError:
    """The error answer of a job that ended without images."""
    if snap.status is JobStatus.CANCELED:
        return OpenAIError(409, "the job was canceled before it finished", code="canceled", headers=NO_RETRY)
    error_type, message = snap.error or (ErrorType.JOB_FAILED, "the job failed")
    if is_client_fault(error_type):
        return OpenAIError(400, f"the request cannot run on this model: {message}", code="invalid_request")
    return OpenAIError(
        502,
        f"the generation failed ({error_type}): {message}",
        SERVER_ERROR,
        code="generation_failed",
        headers=NO_RETRY,
    )


async def answer_when_done(
    services: Services, job_id: str, owner: str, request: Request, response_format: str | None
) -> ImagesResponse | JSONResponse:
    """Wait for the job (at most SD_OPENAI_WAIT_S; then it is canceled and the answer is 504, or 499 when
    the client hung up) and answer its images as OpenAI does."""
    settings = services.settings
    try:
        outcome = await wait_for_job(
            services.redis.aio, job_id, settings.openai_wait_s, disconnected=request.is_disconnected
        )
    except RedisError:
        # the client gets a 503 and will not read this job: cancel it if Redis still lets us
        with contextlib.suppress(Exception):
            await run_in_threadpool(cancel_unfinished, services, job_id, owner)
        raise
    if outcome is not WaitOutcome.ENDED:
        unfinished = await run_in_threadpool(cancel_unfinished, services, job_id, owner)
        if unfinished is not None and outcome is WaitOutcome.DISCONNECTED:
            log.info("job %s canceled: its OpenAI client hung up while %s", job_id, where(unfinished))
            return OpenAIError(CLIENT_CLOSED_REQUEST, "the client closed the request").response()
        if unfinished is not None:
            log.info(
                "job %s canceled: no result within %g s (%s)",
                job_id,
                settings.openai_wait_s,
                where(unfinished),
            )
            raise OpenAIError(
                504,
                f"no result within {settings.openai_wait_s:g} s (SD_OPENAI_WAIT_S; the job was "
                f"{where(unfinished)}); the job was canceled: retry later, or ask for fewer steps or images",
                SERVER_ERROR,
                code="timeout",
                headers=NO_RETRY,
            )
    as_bytes = response_format == "b64_json"
    done = await run_in_threadpool(finish, services, job_id, owner, as_bytes)
    if done.snapshot.status is not JobStatus.SUCCEEDED:
        raise failure(done.snapshot)
    base = settings.public_url or str(request.base_url).rstrip("/")
    data = [
        ImageData(b64_json=base64.b64encode(file).decode("ascii"), seed=ref.seed)
        if file is not None
        else ImageData(url=base + image_url(job_id, ref.index, ref.format), seed=ref.seed)
        for ref, file in done.images
    ]
    return ImagesResponse(created=int(time.time()), data=data)


GENERATION_EXAMPLES = {
    "openai": {
        "summary": "OpenAI's fields",
        "value": {"prompt": PROMPT_EXAMPLE, "n": 2, "size": "512x512", "response_format": "b64_json"},
    },
    "extras": {
        "summary": "With this API's extras",
        "value": {
            "prompt": PROMPT_EXAMPLE,
            "size": "512x768",
            "negative_prompt": "blurry, low quality",
            "steps": 30,
            "guidance_scale": 7.5,
            "seed": 1234,
            "response_format": "url",
        },
    },
}


def build_router(settings: Settings) -> APIRouter:
    request_class = generation_request_model(settings)
    router = APIRouter(
        prefix="/v1",
        tags=["openai"],
        route_class=openai_route_class(settings.retry_after_s, size_rule(settings)),
    )

    @router.post(
        "/images/generations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        summary="Generate images (OpenAI Images API): queue a job and answer once it ended",
        description=(
            "OpenAI's request and answer shapes (`output_format` png, jpeg or webp and `output_compression` "
            "included), plus `negative_prompt`, `steps`, `guidance_scale`, `sampler`, "
            "`scheduler`, `eta` and `seed` (with OpenAI's Python client: `extra_body={...}`). Same validation, limits "
            "and API keys as `POST /v1/txt2img`. `model` picks one of `GET /v1/models` (left out: the "
            "default model); a model not served is a 404 `model_not_found`, one without a live worker now a "
            "503 `model_unavailable`. Waits at most `SD_OPENAI_WAIT_S` seconds; then answers "
            '504 and cancels the job. Errors are `{"error": {message, type, param, code}}`.'
        ),
        responses=openai_error_responses(400, 401, 404, 409, 429, 502, 503, 504),
    )
    async def create_images(
        body: Annotated[request_class, Body(openapi_examples=GENERATION_EXAMPLES)],
        owner: Owner,
        services: ServicesDep,
        request: Request,
    ) -> ImagesResponse | JSONResponse:
        txt2img = to_txt2img(body, settings)
        job = await run_in_threadpool(submit_job, services, txt2img, owner)
        return await answer_when_done(services, job.id, owner, request, body.response_format)

    edit_class = edit_request_model(settings)
    edit_form = edit_class.model_json_schema(ref_template="#/components/schemas/{model}")
    edit_form.pop("$defs", None)
    edit_form["properties"] = {
        "image": {
            "type": "string",
            "format": "binary",
            "description": "The image to edit (PNG, JPEG or WebP).",
        },
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "A PNG of the image's size whose fully transparent pixels (alpha 0) are where to "
            "edit. Left out: the image's own fully transparent pixels, if any, else the whole image.",
        },
        **edit_form["properties"],
    }
    edit_form["required"] = ["image", *edit_form.get("required", [])]

    @router.post(
        "/images/edits",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        summary="Edit an image (OpenAI Images API): queue an inpainting or img2img job and answer once it ended",
        description=(
            "OpenAI's multipart form: `image`, `mask` (fully transparent pixels, alpha 0, mark where to edit; "
            "left out: the image's own transparent pixels, else the whole image is redrawn), `prompt`, `n`, "
            "`size` (left out: the image's size), `response_format`, `model`; plus this API's extras as form "
            "fields, `strength` (the share of the steps run, default 0.8) and `mask_blur` among them. The "
            "waiting and the errors are `/v1/images/generations`' (an unusable file: 400 naming `image` or "
            "`mask`)."
        ),
        openapi_extra={
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": edit_form}}}
        },
        responses=openai_error_responses(400, 401, 404, 409, 429, 502, 503, 504),
    )
    async def edit_images(
        owner: Owner, services: ServicesDep, request: Request
    ) -> ImagesResponse | JSONResponse:
        values, files = await read_body(request, edit_class, ("image", "mask"))
        try:
            body = edit_class.model_validate(values)
        except ValidationError as error:
            raise RequestValidationError(error.errors(include_url=False)) from None
        edit = to_txt2img(body, settings, edit=True)
        images = await run_in_threadpool(edit_files, files, settings)  # decodes an alpha mask
        job = await run_in_threadpool(submit_with_images, services, edit, images, owner)
        return await answer_when_done(services, job.id, owner, request, body.response_format)

    @router.get(
        "/models",
        response_model=ModelList,
        summary="The models live workers serve (OpenAI's list shape)",
        dependencies=[Depends(get_owner)],
        responses=openai_error_responses(401, 503),
    )
    async def list_models(services: ServicesDep) -> ModelList:
        return ModelList(data=await served_models(services))

    @router.get(
        "/models/{model_id}",
        response_model=ModelObject,
        summary="One served model",
        dependencies=[Depends(get_owner)],
        responses=openai_error_responses(401, 404, 503),
    )
    async def get_model(model_id: str, services: ServicesDep) -> ModelObject:
        served = await served_models(services)
        for model in served:
            if model.id == model_id:
                return model
        names = ", ".join(m.id for m in served) or "none (no live worker)"
        raise OpenAIError(
            404, f"model {model_id!r} is not served; served: {names}", param="model", code="model_not_found"
        )

    return router


async def served_models(services: Services) -> list[ModelObject]:
    """One entry per model with live workers, by name: what its newest worker publishes, its live
    workers and the start time of the oldest of them."""
    workers = await live_workers(services.redis.aio, services.settings.worker_stale_s)
    served = group_by_model(workers)
    default = services.settings.default_model or (next(iter(served)) if len(served) == 1 else None)
    models = []
    for name, model in served.items():
        info = model.info
        default_steps, default_guidance_scale = sampling_defaults(services.settings, info)
        models.append(
            ModelObject(
                id=name,
                created=int(min(worker.started_at for worker in model.workers)),
                native_width=info.native_width,
                native_height=info.native_height,
                family=info.family,
                workers=len(model.workers),
                default=name == default,
                size_multiple=info.size_multiple,
                default_steps=default_steps,
                default_guidance_scale=default_guidance_scale,
                default_sampler=info.default_sampler or DEFAULT_SAMPLER,
                default_scheduler=recommended_scheduler(info.default_sampler or DEFAULT_SAMPLER, info),
                samplers=info.samplers or list(SAMPLERS),
            )
        )
    return models
