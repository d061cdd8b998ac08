"""Queue one generation: the one path every route that creates jobs goes through.

The model (service/model_routing.py: 422 unknown, 503 without a live worker), the queue-depth limit
of its queue (429), defaults and limits from that model, cross-field checks (422), enqueue and
metrics: POST /v1/txt2img, POST /v1/images/generations and /sdapi/v1/txt2img all call `submit_job`
(the routes that take images too, through service/image_jobs.py), so their rules cannot drift apart. Synchronous (RQ is): call it from a plain `def` route or through
the thread pool.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from schemas.generation import Generation
from schemas.queue import JobStatus
from schemas.redis_keys import MODEL_FORGET_S, MODELS_ZSET
from schemas.worker_info import WorkerInfo
from service.api_models import Txt2ImgRequestBase
from service.deps import Services
from service.job_store import QueueFull
from service.live_workers import live_workers_sync
from service.model_routing import ModelUnavailable, ServedModel, choose_model, served_models
from service.resolve import resolve_params
from service.webhooks import check_submission

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuedJob:
    id: str
    status: JobStatus
    queue_position: int | None
    params: Generation


def seen_recently(services: Services, model: str) -> bool:
    """Whether a worker of `model` has beaten in the last MODEL_FORGET_S (it is known, if not live)."""
    last_s = services.redis.sync.zscore(MODELS_ZSET, model)
    return last_s is not None and last_s > time.time() - MODEL_FORGET_S


def route(services: Services, requested: str | None, workers: list[WorkerInfo] | None = None) -> ServedModel:
    """The served model a request naming `requested` (or none) runs on, from the live `workers` (read
    when not given); UnknownModel (422), a 422 when several are served and none is chosen, or
    ModelUnavailable (503)."""
    settings = services.settings
    if workers is None:
        workers = live_workers_sync(services.redis.sync, settings.worker_stale_s)
    try:
        return choose_model(
            requested,
            served_models(workers),
            settings.default_model,
            lambda name: seen_recently(services, name),
            settings.retry_after_s,
        )
    except ModelUnavailable as error:
        services.metrics.jobs_rejected.labels("model_unavailable", error.model or "").inc()
        raise


def submit_job(
    services: Services,
    request: Txt2ImgRequestBase,
    owner: str,
    workers: list[WorkerInfo] | None = None,
    image_size: tuple[int, int] | None = None,
) -> QueuedJob:
    """Enqueue a validated request for `owner` on its model's queue; QueueFull, ModelUnavailable or a
    422 RequestValidationError otherwise. `workers`: the live workers, when the caller read them;
    `image_size`: the init image's (width, height), what a size left out defaults to."""
    settings = services.settings
    webhook_url = getattr(request, "webhook_url", None)
    if webhook_url is not None:
        check_submission(webhook_url, settings)  # the deployment's hosts and addresses (422)
    model = route(services, getattr(request, "model", None), workers)
    params = resolve_params(request, settings, model.info, image_size)
    try:
        job_id, status, position = services.store.submit(params, owner, webhook_url)
    except QueueFull:
        services.metrics.jobs_rejected.labels("queue_full", model.name).inc()
        raise
    services.metrics.jobs_submitted.labels(model.name).inc()
    log.info(
        "queued job %s on %s (%dx%d, %d steps, %d images)",
        job_id,
        model.name,
        params.width,
        params.height,
        params.steps,
        params.num_images,
    )
    return QueuedJob(id=job_id, status=status, queue_position=position, params=params)
