"""POST /v1/img2img: img2img and inpainting, queued as a txt2img job is (same job, progress, cancel,
previews, answer). The body is the txt2img request plus `init_image`, `mask_image` and the image
settings (strength, mask_blur, resize_mode), as JSON with the images base64-encoded, or as
multipart/form-data with the images as file parts."""

# No `from __future__ import annotations`: FastAPI must see the request class built in build_router.

from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.api_models import JobAccepted, ValidationErrorBody, img2img_request_model
from service.deps import Owner, ServicesDep
from service.errors import validation_error
from service.form_body import read_body
from service.image_jobs import InputFiles, submit_with_images
from service.input_images import InputImageInvalid, check_image, check_mask_size, from_base64
from service.openapi_docs import VALIDATION_EXAMPLE, error_responses
from service.settings import Settings

IMAGE_FIELDS = ("init_image", "mask_image")  # the files of the request (base64 in JSON)


def input_files(values: dict[str, Any], files: dict[str, bytes], settings: Settings) -> InputFiles:
    """The request's images, from its files (a form) or its base64 strings (JSON), checked; a 422 naming
    the field otherwise."""
    found: dict[str, bytes] = dict(files)
    for field in IMAGE_FIELDS:
        if field not in found and isinstance(values.get(field), str):
            found[field] = from_base64(values[field], field)
    init = check_image(found["init_image"], "init_image", settings.max_input_pixels)
    mask = None
    if "mask_image" in found:
        mask = check_image(found["mask_image"], "mask_image", settings.max_input_pixels)
        check_mask_size(init, mask, "mask_image")
    return InputFiles(init, mask)


def build_router(settings: Settings) -> APIRouter:
    request_class = img2img_request_model(settings)
    router = APIRouter(prefix="/v1", tags=["jobs"])
    # the body is read by hand (JSON or a form): its schema is given here. Its $defs (LoraRef) are the
    # txt2img request's, which FastAPI publishes in the components already.
    json_schema = request_class.model_json_schema(ref_template="#/components/schemas/{model}")
    json_schema.pop("$defs", None)

    @router.post(
        "/img2img",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=JobAccepted,
        summary="Queue an img2img or inpainting job",
        description="The txt2img request plus an init image (and, to inpaint, a mask of its size: white is "
        "repainted, black kept) and the image settings. JSON with the images base64-encoded, or "
        "multipart/form-data with them as file parts (`init_image`, `mask_image`) and the other fields as form "
        "fields, numbers and booleans spelled as in JSON. The job is then a txt2img job's (GET /v1/jobs/{id}); its "
        "images' parameters hold the `Denoising strength`. Input images: PNG, JPEG or WebP, at most "
        f"SD_MAX_INPUT_PIXELS ({settings.max_input_pixels}) pixels, bodies at most SD_MAX_UPLOAD_BYTES "
        f"({settings.max_upload_bytes}).",
        openapi_extra={
            "requestBody": {
                "required": True,
                # multipart/form-data takes the same fields (described above), left out here: a form
                # cannot carry every JSON type (loras), and the schema would promise what it cannot
                "content": {"application/json": {"schema": json_schema}},
            }
        },
        responses={
            202: {
                "description": "Queued. `Location` is the job's URL.",
                "headers": {"Location": {"description": "/v1/jobs/{id}", "schema": {"type": "string"}}},
            },
            422: {
                "description": "A field is invalid (an image that is not PNG, JPEG or WebP, truncated, too big, "
                "a mask of another size...): `loc` names it, `msg` says why.",
                "model": ValidationErrorBody,
                "content": {"application/json": {"example": VALIDATION_EXAMPLE}},
            },
            **error_responses(400, 401, 413, 429, 503),
        },
    )
    async def create_job(
        request: Request, owner: Owner, services: ServicesDep, response: Response
    ) -> JobAccepted:
        values, files = await read_body(request, request_class, IMAGE_FIELDS)
        for field in files:  # a file part stands for the field: the model sees it given
            values[field] = ""
        try:
            body = request_class.model_validate(values)
        except ValidationError as error:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
            ) from None
        try:  # in the thread pool: base64 and CRCs of megabytes would hold the event loop
            images = await run_in_threadpool(input_files, values, files, settings)
        except InputImageInvalid as error:
            raise validation_error(error.field, error.message, "invalid_image") from None
        job = await run_in_threadpool(submit_with_images, services, body, images, owner)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return JobAccepted(id=job.id, status=job.status, queue_position=job.queue_position)

    return router
