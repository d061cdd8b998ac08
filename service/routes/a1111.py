"""AUTOMATIC1111-compatible routes under /sdapi/v1: what Open WebUI, SillyTavern, `webuiapi` and many
plugins speak. The bodies and their translation live in service/a1111_models.py.

POST /sdapi/v1/txt2img (and /img2img, whose images are checked and stored as POST /v1/img2img's:
service/image_jobs.py) queues a normal job (same validation, limits, API keys and 429 as POST
/v1/txt2img, through `submit_job`) and waits for it without holding a thread, at most SD_OPENAI_WAIT_S
seconds (then 504, and the job is canceled); a client that hangs up gets its job canceled too. Each
API key's A1111 jobs are recorded in Redis (schemas/redis_keys.py: a1111_jobs_key), which is what
/progress reports and /interrupt cancels, and POST /options sets a default model for that key only
(a1111_model_key), never for anyone else. Basic auth with the API key as password is accepted beside
Bearer (service/auth.py). Errors keep A1111's shapes: a 422 is FastAPI's `{"detail": [{loc, msg,
type}]}` naming A1111's fields, every other error `{"error", "detail", "body", "errors"}` with our
status codes (401 with `WWW-Authenticate: Basic`, 429 and 503 with Retry-After, 500 for a failed job).

The routes stay out of /openapi.json: A1111's clients do not read it, and schema-driven fuzzing cannot
tell which option values a server accepts (A1111's own API documents them at its /docs).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from redis.exceptions import RedisError
from rq.job import Job
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.errors import ErrorType, is_client_fault
from schemas.queue import JobStatus
from schemas.redis_keys import a1111_jobs_key, a1111_model_key
from schemas.samplers import DEFAULT_SAMPLER
from schemas.worker_info import WorkerInfo
from service.a1111_models import (
    FIXED_OPTIONS,
    Img2ImgRequest,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
    Txt2ImgResponse,
    info_document,
    model_item,
    model_named,
    options_update,
    png_text,
    rename_error_locations,
    sampler_items,
    scheduler_items,
    to_img2img,
    to_txt2img,
)
from service.deps import Services, ServicesDep
from service.errors import explain, redis_trouble, validation_error
from service.image_jobs import InputFiles, submit_with_images
from service.input_images import InputImageInvalid, check_image, check_mask_size, from_base64
from service.job_status import TERMINAL
from service.job_store import ImageNotFound, JobConflict, JobNotFound, JobSnapshot, QueueFull
from service.job_wait import WaitOutcome, wait_for_job
from service.live_workers import live_workers, live_workers_sync
from service.model_routing import ModelUnavailable
from service.routes.jobs import count_if_first_seen_finished
from service.routes.openai_images import CLIENT_CLOSED_REQUEST, cancel_unfinished, where
from service.settings import Settings
from service.submit import QueuedJob, route, submit_job

log = logging.getLogger(__name__)

MAX_TRACKED_JOBS = 32  # per API key: /progress and /interrupt look at the newest ones


class A1111Error(Exception):
    """An error answer in A1111's shape (modules/api/api.py: handle_exception)."""

    def __init__(
        self, status_code: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code, self.error, self.detail, self.headers = status_code, error, detail, headers

    def response(self) -> JSONResponse:
        body = {"error": self.error, "detail": self.detail, "body": "", "errors": self.detail}
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)


def _as_a1111_error(exc: Exception, retry_after_s: int) -> A1111Error | None:
    if isinstance(exc, A1111Error):
        return exc
    if isinstance(exc, QueueFull):
        return A1111Error(429, "QueueFull", str(exc), {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ModelUnavailable):
        return A1111Error(503, "ModelUnavailable", str(exc), {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, RedisError):
        detail = redis_trouble(exc, "an AUTOMATIC1111 route")
        return A1111Error(503, "ServiceUnavailable", detail, {"Retry-After": str(retry_after_s)})
    if isinstance(exc, JobNotFound | ImageNotFound):
        return A1111Error(404, "JobNotFound", "the job or its images expired before they were read")
    if isinstance(exc, StarletteHTTPException):
        return A1111Error(exc.status_code, "HTTPException", str(exc.detail), exc.headers)
    return None


def _validation_response(exc: RequestValidationError, request: Request) -> JSONResponse:
    errors = [
        {"loc": list(e.get("loc", ())), "msg": explain(e, request), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def a1111_route_class(retry_after_s: int) -> type[APIRoute]:
    """An APIRoute whose errors (its dependencies' too) answer in A1111's shapes."""

    class A1111Route(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    return _validation_response(exc, request)
                except Exception as exc:
                    error = _as_a1111_error(exc, retry_after_s)
                    if error is None:
                        raise  # a bug: the app's catch-all logs it and answers 500
                    return error.response()

            return handle

    return A1111Route


async def get_a1111_owner(request: Request) -> str:
    """The caller's owner id from Bearer or Basic auth (the key as password); a 401 asks for Basic."""
    authorization = request.headers.get("authorization")
    return request.app.state.services.auth.owner_of_header(authorization, challenge="Basic")


A1111Owner = Annotated[str, Depends(get_a1111_owner)]


# --- models and the caller's default one ----------------------------------------------------------


def served_models(workers: list[WorkerInfo]) -> list[str]:
    return sorted({info.model for info in workers})


def caller_model(stored: bytes | None, served: list[str], default_model: str | None) -> str | None:
    """The model a caller's A1111 jobs go to unless their override_settings name another: the one it
    chose with POST /options while it is served, else SD_DEFAULT_MODEL while served, else the first
    served one by name (A1111 always has a current checkpoint, and its clients read it from GET
    /options). With none served, the choice (or None): its jobs answer 503."""
    chosen = stored.decode() if stored else None
    if chosen in served or not served:
        return chosen
    if default_model in served:
        return default_model
    return served[0]


# --- txt2img --------------------------------------------------------------------------------------


def input_files(init: str, mask: str | None, max_pixels: int) -> InputFiles:
    """An img2img body's images (base64), checked; a 422 naming A1111's field otherwise."""
    try:
        image = check_image(from_base64(init, "init_images"), "init_images", max_pixels)
        if mask is None:
            return InputFiles(image)
        mask_file = check_image(from_base64(mask, "mask"), "mask", max_pixels)
        check_mask_size(image, mask_file, "mask")
    except InputImageInvalid as error:
        raise validation_error(error.field, error.message, "invalid_image") from None
    return InputFiles(image, mask_file)


def queue_txt2img(services: Services, body: Txt2ImgRequest, owner: str) -> QueuedJob:
    """Thread pool: translate, queue (submit_job: limits, defaults, metrics; an Img2ImgRequest with its
    images: submit_with_images) and record the job."""
    settings = services.settings
    workers = live_workers_sync(services.redis.sync, settings.worker_stale_s)
    served = served_models(workers)
    override = (body.override_settings or {}).get("sd_model_checkpoint")
    stored = services.redis.sync.get(a1111_model_key(owner))
    wanted = model_named(override, served) or caller_model(stored, served, settings.default_model)
    model = route(services, wanted, workers)  # 503 while it has no live worker
    default_sampler = model.info.default_sampler or DEFAULT_SAMPLER
    if isinstance(body, Img2ImgRequest):
        edit, init, mask = to_img2img(body, settings, served, default_sampler)
        files = input_files(init, mask, settings.max_input_pixels)
        try:
            job = submit_with_images(
                services, edit.model_copy(update={"model": model.name}), files, owner, workers
            )
        except RequestValidationError as error:  # a rule across fields (strength and steps): A1111's names
            raise RequestValidationError(rename_error_locations(error.errors())) from None
    else:
        request = to_txt2img(body, settings, served, default_sampler).model_copy(update={"model": model.name})
        job = submit_job(services, request, owner, workers)
    keep_s = max(settings.openai_wait_s, settings.job_timeout_s) + settings.result_ttl_s
    key = a1111_jobs_key(owner)
    with services.redis.sync.pipeline() as pipe:
        pipe.zadd(key, {job.id: time.time()})
        pipe.zremrangebyrank(key, 0, -MAX_TRACKED_JOBS - 1)
        pipe.expire(key, int(keep_s))
        pipe.execute()
    return job


def ended_job(services: Services, job_id: str, owner: str) -> tuple[JobSnapshot, list[bytes]]:
    """Thread pool: the ended job's snapshot (counted in the metrics once) and its PNGs."""
    store = services.store
    job = store.find(job_id, owner)
    snap = store.snapshot(job)
    count_if_first_seen_finished(services, snap)
    if snap.status is not JobStatus.SUCCEEDED or snap.result is None:
        return snap, []
    return snap, [store.image(job, ref.index)[0] for ref in snap.result.images]


def job_failure(snap: JobSnapshot) -> A1111Error:
    error_type, message = snap.error or (ErrorType.JOB_FAILED, "the job failed")
    if is_client_fault(error_type):
        return A1111Error(400, error_type, f"the request cannot run on this model: {message}")
    return A1111Error(500, error_type, f"the generation failed: {message}")


# --- progress, interrupt -------------------------------------------------------------------------

IDLE_STATE: dict[str, Any] = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
}


def active_jobs(services: Services, owner: str) -> list[tuple[Job, JobSnapshot]]:
    """Thread pool: the caller's A1111 jobs still queued or running, oldest first (the record forgets
    the others)."""
    client, store = services.redis.sync, services.store
    key = a1111_jobs_key(owner)
    active, ended = [], []
    for raw in client.zrange(key, -MAX_TRACKED_JOBS, -1):
        job_id = raw.decode() if isinstance(raw, bytes) else raw
        try:
            job = store.find(job_id, owner)
            snap = store.snapshot(job)
        except JobNotFound:
            ended.append(job_id)
            continue
        if snap.status in TERMINAL:
            ended.append(job_id)
        else:
            active.append((job, snap))
    if ended:
        client.zrem(key, *ended)
    return active


def progress_of(services: Services, owner: str, skip_current_image: bool) -> ProgressResponse:
    """Thread pool: A1111's progress of the caller's current job (the running one, else the oldest
    queued); `job_count` counts all of its unfinished A1111 jobs."""
    active = active_jobs(services, owner)
    if not active:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=IDLE_STATE)
    running = [pair for pair in active if pair[1].status is JobStatus.RUNNING]
    job, snap = (running or active)[0]
    # A1111's formula (modules/api/api.py: progressapi): 0.01, then this job's share of job_count
    fraction = snap.step / snap.total_steps if snap.total_steps else 0.0
    value = min(0.01 + fraction / len(active), 1.0)
    started = snap.started_at or snap.created_at
    elapsed_s = max(time.time() - started.timestamp(), 0.0) if started else 0.0
    state = {
        **IDLE_STATE,
        "interrupted": snap.cancel_requested,
        "job": f"txt2img {snap.id}",
        "job_count": len(active),
        "job_timestamp": snap.created_at.strftime("%Y%m%d%H%M%S") if snap.created_at else "0",
        "sampling_step": snap.step,
        "sampling_steps": snap.total_steps,
        "queue_position": snap.queue_position,  # not A1111's: jobs ahead of this one (0: next)
    }
    current_image = None
    if snap.preview_ready and not skip_current_image:
        with contextlib.suppress(ImageNotFound):  # the job ended meanwhile
            current_image = base64.b64encode(services.store.preview(job)).decode("ascii")
    return ProgressResponse(
        progress=value,
        eta_relative=elapsed_s / value - elapsed_s,
        state=state,
        current_image=current_image,
        textinfo=where(snap),
    )


def cancel_all(services: Services, owner: str) -> None:
    """Thread pool: cancel the caller's queued and running A1111 jobs."""
    for job, _ in active_jobs(services, owner):
        with contextlib.suppress(JobConflict, JobNotFound):  # it ended meanwhile
            services.store.cancel(job)


async def served_now(services: Services) -> list[str]:
    return served_models(await live_workers(services.redis.aio, services.settings.worker_stale_s))


async def answer_when_done(
    services: Services, body: Txt2ImgRequest, job: QueuedJob, owner: str, request: Request
) -> Txt2ImgResponse | JSONResponse:
    """Wait for the job (at most SD_OPENAI_WAIT_S; then it is canceled and the answer is 504, or 499 when
    the client hung up) and answer as A1111 does."""
    settings = services.settings
    try:
        outcome = await wait_for_job(
            services.redis.aio, job.id, settings.openai_wait_s, disconnected=request.is_disconnected
        )
    except RedisError:
        with contextlib.suppress(Exception):  # the client gets a 503 and will not read this job
            await run_in_threadpool(cancel_unfinished, services, job.id, owner)
        raise
    if outcome is not WaitOutcome.ENDED:
        unfinished = await run_in_threadpool(cancel_unfinished, services, job.id, owner)
        if unfinished is not None and outcome is WaitOutcome.DISCONNECTED:
            log.info("job %s canceled: its A1111 client hung up while %s", job.id, where(unfinished))
            return A1111Error(
                CLIENT_CLOSED_REQUEST, "ClientDisconnected", "the client closed the request"
            ).response()
        if unfinished is not None:
            log.info(
                "job %s canceled: no result within %g s (%s)",
                job.id,
                settings.openai_wait_s,
                where(unfinished),
            )
            raise A1111Error(
                504,
                "TimeoutError",
                f"no result within {settings.openai_wait_s:g} s (SD_OPENAI_WAIT_S; the job was "
                f"{where(unfinished)}); the job was canceled: retry later, or ask for fewer steps or images",
            )
    snap, pngs = await run_in_threadpool(ended_job, services, job.id, owner)
    if snap.status is JobStatus.FAILED:
        raise job_failure(snap)
    model = snap.result.model if snap.result else None
    # interrupted (POST /interrupt or /skip): like A1111, an answer, here without images
    infotexts = [png_text(png) or "" for png in pngs]
    info = info_document(body, snap.params, model, infotexts, snap.created_at, snap.warnings)
    images = [base64.b64encode(png).decode("ascii") for png in pngs] if body.send_images is not False else []
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:  # as A1111: not echoed back
        parameters |= {"init_images": None, "mask": None}
    return Txt2ImgResponse(images=images, parameters=parameters, info=info)


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(
        prefix="/sdapi/v1",
        tags=["automatic1111"],
        include_in_schema=False,
        route_class=a1111_route_class(settings.retry_after_s),
    )

    @router.post("/txt2img", response_model=Txt2ImgResponse)
    async def txt2img(
        body: Txt2ImgRequest, owner: A1111Owner, services: ServicesDep, request: Request
    ) -> Txt2ImgResponse | JSONResponse:
        job = await run_in_threadpool(queue_txt2img, services, body, owner)
        return await answer_when_done(services, body, job, owner, request)

    @router.post("/img2img", response_model=Txt2ImgResponse)
    async def img2img(
        body: Img2ImgRequest, owner: A1111Owner, services: ServicesDep, request: Request
    ) -> Txt2ImgResponse | JSONResponse:
        job = await run_in_threadpool(queue_txt2img, services, body, owner)
        return await answer_when_done(services, body, job, owner, request)

    @router.get("/progress", response_model=ProgressResponse)
    def progress(
        owner: A1111Owner, services: ServicesDep, skip_current_image: bool = False
    ) -> ProgressResponse:
        return progress_of(services, owner, skip_current_image)

    @router.post("/interrupt")
    def interrupt(owner: A1111Owner, services: ServicesDep) -> dict:
        cancel_all(services, owner)
        return {}

    @router.post("/skip")
    def skip(owner: A1111Owner, services: ServicesDep) -> None:
        cancel_all(services, owner)  # one job makes all its images at once: skipping one is stopping all

    # --- options and models -----------------------------------------------------------------------

    @router.get("/options")
    async def get_options(owner: A1111Owner, services: ServicesDep) -> dict[str, Any]:
        served = await served_now(services)
        stored = await services.redis.aio.get(a1111_model_key(owner))
        model = caller_model(stored, served, settings.default_model)
        return {"sd_model_checkpoint": model, **FIXED_OPTIONS}

    @router.post("/options")
    async def set_options(
        owner: A1111Owner, services: ServicesDep, body: Annotated[dict[str, Any], Body()]
    ) -> None:
        sets_model, model = options_update(body, await served_now(services))
        if sets_model and model is None:
            await services.redis.aio.delete(a1111_model_key(owner))
        elif sets_model:
            await services.redis.aio.set(a1111_model_key(owner), model)

    @router.get("/sd-models", response_model=list[SDModelItem])
    async def sd_models(owner: A1111Owner, services: ServicesDep) -> list[SDModelItem]:
        return [model_item(name) for name in await served_now(services)]

    @router.get("/samplers", response_model=list[SamplerItem])
    async def samplers(owner: A1111Owner) -> list[SamplerItem]:
        return sampler_items()

    @router.get("/schedulers", response_model=list[SchedulerItem])
    async def schedulers(owner: A1111Owner) -> list[SchedulerItem]:
        return scheduler_items()

    @router.get("/loras")
    async def loras(owner: A1111Owner, services: ServicesDep) -> list[dict[str, Any]]:
        """A1111's LoRA list (name, alias, path, metadata): the usable LoRAs of every served model
        (GET /v1/loras has ours, per model); prompts name them as <lora:name:weight>."""
        workers = await live_workers(services.redis.aio, settings.worker_stale_s)
        found: dict[str, dict[str, Any]] = {}
        for info in workers:
            for lora in info.loras:
                if lora.usable and lora.name not in found:
                    found[lora.name] = {
                        "name": lora.name,
                        "alias": lora.name,
                        "path": f"{lora.name}.safetensors",
                        "metadata": {"ss_base_model_version": lora.family, "ss_network_dim": str(lora.rank)},
                    }
        return [found[name] for name in sorted(found)]

    # What this server has none of, in A1111's shapes.
    for path in ("/upscalers", "/latent-upscale-modes", "/sd-vae", "/hypernetworks", "/face-restorers",
                 "/prompt-styles", "/realesrgan-models", "/script-info"):  # fmt: skip
        router.add_api_route(path, _nothing, methods=["GET"], dependencies=[Depends(get_a1111_owner)])

    @router.get("/embeddings")
    async def embeddings(owner: A1111Owner) -> dict[str, dict]:
        return {"loaded": {}, "skipped": {}}

    @router.get("/scripts")
    async def scripts(owner: A1111Owner) -> dict[str, list]:
        return {"txt2img": [], "img2img": []}

    @router.get("/cmd-flags")
    async def cmd_flags(owner: A1111Owner) -> dict[str, Any]:
        return {"api": True, "nowebui": True, "api_auth": None, "api_log": False, "xformers": False}

    @router.get("/memory")
    async def memory(owner: A1111Owner) -> dict[str, dict]:
        return {"ram": _ram(), "cuda": {"error": "unavailable: the GPUs are the workers', not the API's"}}

    return router


async def _nothing() -> list:
    return []


def _ram() -> dict[str, float | str]:
    """A1111's RAM figures (total, this process's resident size, free = total - used), where the OS
    tells them (Linux)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError) as error:
        return {"error": str(error)}
    return {"free": total - used, "used": used, "total": total}
