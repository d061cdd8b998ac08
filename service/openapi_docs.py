"""OpenAPI texts shared by the routes: the API description and the documented error answers."""

from __future__ import annotations

from typing import Any

from service.api_models import ErrorBody

API_DESCRIPTION = """
Text-to-image generation with Stable Diffusion, served by GPU workers through a Redis queue.

1. `POST /v1/txt2img` queues a job on its model's queue (`model`: one of `GET /v1/models`; left out:
   the default model) and answers `202` with its id and `Location`.
2. `GET /v1/jobs/{id}` reports `status` (`queued`, `running`, `succeeded`, `failed`, `canceled`),
   `queue_position` (**0-based**: the number of jobs ahead of this one; 0 = next to run; null when
   not queued), `progress` (denoising step of total), the resolved request (with its seed),
   image URLs once succeeded, and `error {type, message}` once failed.
3. `GET /v1/jobs/{id}/images/{index}.{png|jpeg|webp}` returns the image in the request's
   `output_format` (immutable; cacheable until it expires); `GET /v1/jobs/{id}/events` streams the
   same statuses as server-sent events, and a request's `webhook_url` is called when the job ends.
4. `DELETE /v1/jobs/{id}` cancels: a queued job at once (200, `canceled`), a running one at its
   next denoising step (202, still `running` with `cancel_requested: true`); a job that already
   succeeded or failed answers 409; canceling a canceled job is a no-op (200).

Jobs, results and images expire after `SD_RESULT_TTL_S` seconds (then 404).
When API keys are configured, every `/v1` route needs `Authorization: Bearer KEY`, and a job is
visible only to the key that created it (others get 404).
Errors are JSON: `{"detail": "..."}`, or for 422 a list of `{loc, msg, type}` naming each field and
its allowed range.
"""

_ERROR_EXAMPLES: dict[int, tuple[str, str]] = {
    400: ("Body could not be decoded (e.g. not UTF-8)", "There was an error parsing the body"),
    401: ("Missing or invalid API key", "missing API key: send the header `Authorization: Bearer <key>`"),
    404: ("Unknown or expired job", "job not found: unknown id, expired, or created with another API key"),
    409: ("Job already ended", "job 3f2c1a9e8b7d4c6e9a0b1c2d3e4f5a6b already succeeded; nothing to cancel"),
    413: ("Body too large", "request body too large: at most 65536 bytes"),
    429: (
        "The model's queue is full",
        "the queue is full for model sd15 (100 jobs waiting, limit 100); retry in 10 s",
    ),
    503: (
        "Redis unreachable, or the model has no live worker",
        "the job store (Redis) is unreachable; retry later",
    ),
}

_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the given error codes, each with the JSON body and an example."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        summary, detail = _ERROR_EXAMPLES[code]
        entry: dict[str, Any] = {
            "model": ErrorBody,
            "description": summary,
            "content": {"application/json": {"example": {"detail": detail}}},
        }
        if code in (429, 503):
            entry["headers"] = _RETRY_AFTER
        responses[code] = entry
    return responses


VALIDATION_EXAMPLE = {
    "detail": [
        {
            "loc": ["body", "steps"],
            "msg": "Input should be less than or equal to 150",
            "type": "less_than_equal",
        }
    ]
}
