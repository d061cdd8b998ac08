"""OpenAI-style errors for the OpenAI-compatible routes: `{"error": {message, type, param, code}}`.

The rest of the API answers `{"detail": ...}` (service/errors.py). The routes of the OpenAI router
use `OpenAIRoute`, which turns the same exceptions (validation, auth, queue full, Redis down) into
OpenAI's shape and status codes, so that OpenAI's client libraries raise their usual errors
(400 BadRequestError, 401 AuthenticationError, 429 RateLimitError, ...). Answers that a retry
cannot fix carry `x-should-retry: false`, which OpenAI's clients obey.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import redis_trouble
from service.input_images import InputImageInvalid
from service.job_store import JobNotFound, QueueFull
from service.model_routing import ModelUnavailable, UnknownModel
from service.openai_models import OpenAIErrorBody, OpenAIErrorDetail

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
NO_RETRY = {"x-should-retry": "false"}


class OpenAIError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(
        self,
        status_code: int,
        message: str,
        error_type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = OpenAIErrorBody(
            error=OpenAIErrorDetail(message=message, type=error_type, param=param, code=code)
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status_code, headers=self.headers)


# How a validation error located at a txt2img field reads in OpenAI's terms: the field names differ.
TXT2IMG_TO_OPENAI = {"num_images": "n", "width": "size", "height": "size"}


def from_validation_errors(errors: Sequence[Any], size_rule: str) -> OpenAIError:
    """A 400 for the first of pydantic's errors, naming the field (OpenAI's name) and the rule.

    `size_rule` says what a valid `size` is; txt2img's width/height errors are told in its terms.
    """
    if not errors:
        return OpenAIError(400, "invalid request")
    error = errors[0]
    loc = [part for part in error.get("loc", ()) if part != "body"]
    field = str(loc[0]) if loc and isinstance(loc[0], str) else None
    kind = error.get("type", "")
    msg = error.get("msg", "invalid value")
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error")
        position = error.get("loc", ())[-1] if error.get("loc") else None
        where = f" at character {position}" if isinstance(position, int) else ""
        detail = f": {reason}" if reason else ""
        return OpenAIError(400, f"the body is not valid JSON{where}{detail}", code="invalid_json")
    if field is None:
        return OpenAIError(400, f"the body must be a JSON object with at least `prompt`: {msg}")
    param = TXT2IMG_TO_OPENAI.get(field, field)
    if kind == "extra_forbidden":
        return OpenAIError(400, f"unrecognized request argument supplied: {field}", param=field)
    if field == "size":
        return OpenAIError(400, f"size: {size_rule}", param="size", code="invalid_size")
    if field in ("width", "height"):
        if msg.startswith("Input "):  # pydantic's bound on one side: say which, and the whole rule
            return OpenAIError(
                400, f"size: the {field} {msg.removeprefix('Input ')} (size {size_rule})", param="size"
            )
        return OpenAIError(400, f"size: {msg}", param="size")
    return OpenAIError(400, f"{param}: {msg}", param=param)


def _from_exception(exc: Exception, retry_after_s: int, size_rule: str) -> OpenAIError | None:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, UnknownModel):
        return OpenAIError(404, exc.message, param="model", code="model_not_found", headers=NO_RETRY)
    if isinstance(exc, InputImageInvalid):  # the field is already OpenAI's name (image, mask)
        return OpenAIError(400, str(exc), param=exc.field, code="invalid_image")
    if isinstance(exc, ModelUnavailable):
        return OpenAIError(
            503,
            str(exc),
            SERVER_ERROR,
            param="model",
            code="model_unavailable",
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    if isinstance(exc, RequestValidationError):
        return from_validation_errors(exc.errors(), size_rule)
    if isinstance(exc, QueueFull):
        return OpenAIError(
            429, str(exc), RATE_LIMIT, code="queue_full", headers={"Retry-After": str(exc.retry_after_s)}
        )
    if isinstance(exc, RedisError):
        return OpenAIError(
            503,
            redis_trouble(exc, "an OpenAI route"),
            SERVER_ERROR,
            code="service_unavailable",
            headers={"Retry-After": str(retry_after_s)},
        )
    if isinstance(exc, JobNotFound):
        return OpenAIError(
            404, "the job expired or was removed before its images were read", code="not_found"
        )
    if isinstance(exc, StarletteHTTPException):
        code = "invalid_api_key" if exc.status_code == 401 else None
        error_type = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
        return OpenAIError(exc.status_code, str(exc.detail), error_type, code=code, headers=exc.headers)
    return None


def openai_route_class(retry_after_s: int, size_rule: str) -> type[APIRoute]:
    """An APIRoute whose errors (its dependencies' too) answer in OpenAI's shape."""

    class OpenAIRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    error = _from_exception(exc, retry_after_s, size_rule)
                    if error is None:
                        raise  # a bug: the app's catch-all logs it and answers 500
                    return error.response()

            return handle

    return OpenAIRoute
