"""POST /v1/txt2img: validate, fill defaults from the served model, enqueue, answer 202."""

# No `from __future__ import annotations`: FastAPI must see the request class built in build_router.

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Response, status

from schemas.jobs import JobStatus
from service.deps import Owner, ServicesDep
from service.errors import QueueFull
from service.live_workers import live_workers_sync
from service.openapi_docs import VALIDATION_EXAMPLE, error_responses
from service.resolve import resolve_params
from service.schemas import PROMPT_EXAMPLE, JobAccepted, ValidationErrorBody, request_model
from service.settings import Settings

log = logging.getLogger(__name__)

REQUEST_EXAMPLES = {
    "minimal": {"summary": "Only a prompt: everything else defaults", "value": {"prompt": PROMPT_EXAMPLE}},
    "full": {
        "summary": "Every field",
        "value": {
            "prompt": PROMPT_EXAMPLE,
            "negative_prompt": "blurry, low quality",
            "width": 512,
            "height": 768,
            "steps": 30,
            "guidance_scale": 7.5,
            "eta": 0.0,
            "seed": 1234,
            "num_images": 2,
        },
    },
}


def build_router(settings: Settings) -> APIRouter:
    """The router for one settings object (its bounds are part of the request schema)."""
    request_class = request_model(settings)
    router = APIRouter(prefix="/v1", tags=["jobs"])

    @router.post(
        "/txt2img",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=JobAccepted,
        summary="Queue a text-to-image job",
        responses={
            202: {
                "description": "Queued. `Location` is the job's URL.",
                "headers": {"Location": {"description": "/v1/jobs/{id}", "schema": {"type": "string"}}},
            },
            422: {
                "description": "A field is invalid: `loc` names it, `msg` gives the allowed range.",
                "model": ValidationErrorBody,
                "content": {"application/json": {"example": VALIDATION_EXAMPLE}},
            },
            **error_responses(400, 401, 413, 429, 503),
        },
    )
    def create_job(
        request: Annotated[request_class, Body(openapi_examples=REQUEST_EXAMPLES)],
        owner: Owner,
        services: ServicesDep,
        response: Response,
    ) -> JobAccepted:
        store = services.store
        depth = store.queue_depth()
        if depth >= settings.max_queue_depth:
            services.metrics.jobs_rejected.labels("queue_full").inc()
            raise QueueFull(depth, settings.max_queue_depth, settings.retry_after_s)
        workers = live_workers_sync(services.redis.sync, settings.worker_stale_s)
        params = resolve_params(request, settings, workers[0] if workers else None)
        job_id, position = store.submit(params, owner)
        services.metrics.jobs_submitted.inc()
        log.info(
            "queued job %s (%dx%d, %d steps, %d images)",
            job_id,
            params.width,
            params.height,
            params.steps,
            params.num_images,
        )
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return JobAccepted(id=job_id, status=JobStatus.QUEUED, queue_position=position)

    return router
