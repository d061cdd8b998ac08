"""Queue one generation: the one path every route that creates jobs goes through.

Queue-depth limit (429), defaults from the served model, cross-field checks (422), enqueue and
metrics: POST /v1/txt2img and POST /v1/images/generations both call `submit_job`, so their rules
cannot drift apart. Synchronous (RQ is): call it from a plain `def` route or through the thread pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from schemas.generation import Generation
from schemas.queue import JobStatus
from service.api_models import Txt2ImgRequestBase
from service.deps import Services
from service.job_store import QueueFull
from service.live_workers import live_workers_sync
from service.resolve import resolve_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuedJob:
    id: str
    status: JobStatus
    queue_position: int | None
    params: Generation


def submit_job(services: Services, request: Txt2ImgRequestBase, owner: str) -> QueuedJob:
    """Enqueue a validated request for `owner`; QueueFull or a 422 RequestValidationError otherwise."""
    settings = services.settings
    workers = live_workers_sync(services.redis.sync, settings.worker_stale_s)
    params = resolve_params(request, settings, workers[0] if workers else None)
    try:
        job_id, status, position = services.store.submit(params, owner)
    except QueueFull:
        services.metrics.jobs_rejected.labels("queue_full").inc()
        raise
    services.metrics.jobs_submitted.inc()
    log.info(
        "queued job %s (%dx%d, %d steps, %d images)",
        job_id,
        params.width,
        params.height,
        params.steps,
        params.num_images,
    )
    return QueuedJob(id=job_id, status=status, queue_position=position, params=params)
