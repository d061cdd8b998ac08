"""POST /v1/txt2img: validate, route to the chosen model, fill its defaults, enqueue, answer 202."""

# No `from __future__ import annotations`: FastAPI must see the request class built in build_router.

from typing import Annotated

from fastapi import APIRouter, Body, Response, status

from service.api_models import PROMPT_EXAMPLE, JobAccepted, ValidationErrorBody, request_model
from service.deps import Owner, ServicesDep
from service.openapi_docs import VALIDATION_EXAMPLE, error_responses
from service.settings import Settings
from service.submit import submit_job

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
        job = submit_job(services, request, owner)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return JobAccepted(id=job.id, status=job.status, queue_position=job.queue_position)

    return router
