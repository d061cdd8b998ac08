"""Queue a job with input images (img2img, inpainting): the files go to Redis under random names with a
TTL (schemas/redis_keys.py: input_image_key), never into the RQ job's JSON; the job names them
(Generation.init_image, mask_image) and is then queued as any other (service/submit.py), its size left
out defaulting to the init image's. Every route that takes images calls `submit_with_images`.

The files live SD_RESULT_TTL_S, as the job's own record: long enough for a queued job, its retries,
and a look at the request afterwards. If the job cannot be queued (422, 429, 503) they are deleted at
once.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from dataclasses import dataclass

from redis.exceptions import RedisError

from schemas.redis_keys import input_image_key
from schemas.worker_info import WorkerInfo
from service.api_models import Txt2ImgRequestBase
from service.deps import Services
from service.input_images import ImageFile
from service.submit import QueuedJob, submit_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFiles:
    """A request's checked input images (service/input_images.py)."""

    init: ImageFile
    mask: ImageFile | None = None


def new_name() -> str:
    """A name no one can guess (128 random bits): the name is all it takes to read the file."""
    return secrets.token_hex(16)


def submit_with_images(
    services: Services,
    request: Txt2ImgRequestBase,
    files: InputFiles,
    owner: str,
    workers: list[WorkerInfo] | None = None,
) -> QueuedJob:
    """Store `files`, then queue `request` (an edit_request_model instance: service/api_models.py) naming
    them; on any failure to queue, the files are deleted and the error raised."""
    names = {"init_image": new_name()}
    if files.mask is not None:
        names["mask_image"] = new_name()
    data = {"init_image": files.init.data, "mask_image": files.mask.data if files.mask else None}
    ttl_s = services.settings.result_ttl_s
    with services.redis.sync.pipeline() as pipe:
        for field, name in names.items():
            pipe.set(input_image_key(name), data[field], ex=ttl_s)
        pipe.execute()
    try:
        named = request.model_copy(
            update={"init_image": names["init_image"], "mask_image": names.get("mask_image")}
        )
        return submit_job(services, named, owner, workers, image_size=files.init.size)
    except BaseException:
        with contextlib.suppress(RedisError):  # Redis away: the TTL removes them
            services.redis.sync.delete(*(input_image_key(name) for name in names.values()))
        raise
