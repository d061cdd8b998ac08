"""GET /v1/jobs/{id}, GET /v1/jobs/{id}/images/{index}.{png|jpeg|webp}, GET /v1/jobs/{id}/preview.png,
DELETE /v1/jobs/{id}. (GET /v1/jobs/{id}/events: service/routes/events.py.)

Plain `def` routes: RQ is synchronous, so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status
from fastapi.responses import JSONResponse

from schemas.generation import OUTPUT_FORMATS
from schemas.queue import MEDIA_TYPES, ImageRef, JobStatus
from service.api_models import (
    JOB_VIEW_EXAMPLE,
    ImageLink,
    JobError,
    JobView,
    Progress,
    ResolvedRequest,
)
from service.deps import Owner, ServicesDep
from service.job_status import TERMINAL
from service.job_store import JobSnapshot
from service.openapi_docs import error_responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IMAGE_RESPONSE = {
    "description": "The image file in the job's `output_format`, the generation parameters inside as "
    "AUTOMATIC1111 writes them: PNG `parameters` text chunk, JPEG/WebP EXIF UserComment.",
    "content": {
        media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in MEDIA_TYPES.values()
    },
    "headers": {
        "Cache-Control": {
            "description": "private, max-age=<seconds left>, immutable",
            "schema": {"type": "string"},
        },
        "ETag": {"description": "Stable per job and index", "schema": {"type": "string"}},
    },
}


def image_url(job_id: str, index: int, image_format: str = "png") -> str:
    """The path of an image: its extension is its format (png, jpeg, webp)."""
    return f"/v1/jobs/{job_id}/images/{index}.{image_format}"


def image_link(job_id: str, ref: ImageRef) -> ImageLink:
    return ImageLink(index=ref.index, seed=ref.seed, url=image_url(job_id, ref.index, ref.format))


def preview_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/preview.png"


def job_view(snap: JobSnapshot) -> JobView:
    params = snap.params
    result = snap.result
    return JobView(
        id=snap.id,
        status=snap.status,
        queue_position=snap.queue_position,
        progress=Progress(step=snap.step, total_steps=snap.total_steps),
        request=ResolvedRequest(**params.model_dump(exclude={"preview"})),
        model=result.model if result else None,
        images=[image_link(snap.id, ref) for ref in result.images] if result else [],
        preview_url=preview_url(snap.id) if snap.preview_ready else None,
        warnings=snap.warnings,
        error=JobError(type=snap.error[0], message=snap.error[1]) if snap.error else None,
        cancel_requested=snap.cancel_requested,
        created_at=snap.created_at,
        started_at=snap.started_at,
        finished_at=snap.finished_at,
    )


def count_if_first_seen_finished(services: ServicesDep, snap: JobSnapshot) -> None:
    if snap.status not in TERMINAL or not services.store.first_time_seen_finished(snap.id):
        return
    wait_s = run_s = None
    if snap.started_at and snap.created_at:
        wait_s = (snap.started_at - snap.created_at).total_seconds()
    if snap.started_at and snap.finished_at:
        run_s = (snap.finished_at - snap.started_at).total_seconds()
    images = len(snap.result.images) if snap.result else 0
    services.metrics.observe_finished(snap.status, wait_s, run_s, images)


@router.get(
    "/{job_id}",
    response_model=JobView,
    summary="A job's status, queue position, progress, images and error",
    responses={
        200: {"content": {"application/json": {"example": JOB_VIEW_EXAMPLE}}},
        **error_responses(401, 404, 503),
    },
)
def get_job(job_id: str, owner: Owner, services: ServicesDep) -> JobView:
    snap = services.store.snapshot(services.store.find(job_id, owner))
    count_if_first_seen_finished(services, snap)
    return job_view(snap)


@router.get(
    "/{job_id}/images/{index}.{extension}",
    response_class=Response,
    summary="One generated image",
    description="The extension is the job's `output_format` (`png`, `jpeg` or `webp`), as in the job's "
    "`images[].url`; another extension is a 404 that names the right one.",
    responses={
        200: IMAGE_RESPONSE,
        304: {"description": "Not modified (If-None-Match matched the ETag)."},
        **error_responses(401, 404, 503),
    },
)
def get_image(
    job_id: str,
    index: int,
    extension: Annotated[
        str,
        Path(
            pattern="^[a-z0-9]+$", description=f"One of {', '.join(OUTPUT_FORMATS)}: the job's output_format."
        ),
    ],
    owner: Owner,
    services: ServicesDep,
    request: Request,
) -> Response:
    store = services.store
    data, ttl_s = store.image(store.find(job_id, owner), index, extension)
    etag = f'"{job_id}-{index}"'  # a job's images never change: the id and index identify the bytes
    headers = {"Cache-Control": f"private, max-age={ttl_s}, immutable", "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(content=data, media_type=MEDIA_TYPES[extension], headers=headers)


@router.get(
    "/{job_id}/preview.png",
    response_class=Response,
    summary="The running job's live preview",
    description="A low-resolution PNG of the first image's current latent (a fixed linear map of its "
    "channels to RGB, no VAE), replaced as the steps go on. Only for jobs submitted with "
    "`preview: true`, while they run; 404 otherwise.",
    responses={
        200: {
            "description": "The latest preview.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(401, 404, 503),
    },
)
def get_preview(job_id: str, owner: Owner, services: ServicesDep) -> Response:
    store = services.store
    data = store.preview(store.find(job_id, owner))
    return Response(content=data, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.delete(
    "/{job_id}",
    response_model=JobView,
    summary="Cancel a job",
    description="Queued: removed at once (200, `canceled`). Running: stops at its next step (202). "
    "Already canceled: no-op (200). Succeeded or failed: 409.",
    responses={
        200: {"description": "Canceled (or already was).", "content": {"application/json": {"example": {
            **JOB_VIEW_EXAMPLE, "status": "canceled", "images": [], "model": None, "cancel_requested": True,
            "progress": {"step": 0, "total_steps": 30}, "started_at": None}}}},
        202: {"description": "Running: cancel requested, it stops at its next step.", "model": JobView},
        **error_responses(401, 404, 409, 503),
    },
)  # fmt: skip
def cancel_job(job_id: str, owner: Owner, services: ServicesDep) -> JSONResponse:
    store = services.store
    outcome = store.cancel(store.find(job_id, owner))
    view = job_view(outcome.snapshot)
    code = status.HTTP_200_OK if view.status is JobStatus.CANCELED else status.HTTP_202_ACCEPTED
    return JSONResponse(view.model_dump(mode="json"), status_code=code)
