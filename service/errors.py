"""Every error answer is JSON with a clear `detail`; none carries a traceback or internals.

- 422: FastAPI's `detail` list, each item `{loc, msg, type}`; `loc` names the field and `msg` the bound.
- 404/409: unknown job or image, conflicting operation. 503: Redis unreachable, or the request's model
  has no live worker (both with Retry-After).
- 500: anything unexpected, logged with its traceback and answered without it (CatchAllMiddleware).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError, OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.job_store import ImageNotFound, JobConflict, JobNotFound, QueueFull
from service.model_routing import ModelUnavailable
from service.route_table import RouteTable

log = logging.getLogger(__name__)


def redis_full(error: RedisError) -> bool:
    """Redis answers but refuses writes: at maxmemory with noeviction (OOM; in a transaction the
    whole transaction is discarded, EXECABORT: nothing was half-written)."""
    return isinstance(error, OutOfMemoryError | ExecAbortError) or (
        isinstance(error, ResponseError) and str(error).startswith(("OOM", "EXECABORT"))
    )


def redis_trouble(error: RedisError, where: str) -> str:
    """What a client is told when Redis fails (503), logged once here."""
    if isinstance(error, RedisConnectionError | RedisTimeoutError):
        log.warning("Redis unreachable on %s: %s", where, error)
        return "the job store (Redis) is unreachable; retry later"
    if redis_full(error):
        log.warning("Redis is full (maxmemory) on %s: %s", where, error)
        return "the job store (Redis) is full (its maxmemory is reached); retry later"
    log.error("Redis error on %s: %r", where, error)
    return "the job store (Redis) failed to answer; retry later"


def validation_error(field: str, message: str, error_type: str) -> RequestValidationError:
    """A 422 in FastAPI's shape for a check pydantic cannot do alone (it needs Redis or several fields)."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": error_type}])


def _detail(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def explain(error: dict, request: Request) -> str:
    """A validation message a client can act on: where JSON failed to parse, and that a body not sent
    as JSON must say so in its Content-Type header."""
    kind, msg = error.get("type", ""), error.get("msg", "")
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error")
        position = error.get("loc", ())[-1] if error.get("loc") else None
        where = f" at character {position}" if isinstance(position, int) else ""
        return f"the body is not valid JSON{where}" + (f": {reason}" if reason else "")
    content_type = request.headers.get("content-type", "")
    if (
        kind == "model_attributes_type"
        and tuple(error.get("loc", ())) == ("body",)
        and "json" not in content_type
    ):
        sent = f"was {content_type!r}" if content_type else "is missing"
        return f"send the body as JSON with the header `Content-Type: application/json` (it {sent})"
    return msg


def install_error_handlers(app: FastAPI, retry_after_s: int, route_table: RouteTable) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            # Starlette's Allow lists one route's methods; GET and DELETE of a job are two routes.
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(route_table.methods(request.url.path))}
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only loc/msg/type: `input` would echo whole prompts, `ctx` may hold exceptions.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": explain(e, request), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(
            {"detail": jsonable_encoder(errors)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
        )

    @app.exception_handler(JobNotFound)
    async def _no_job(request: Request, exc: JobNotFound) -> JSONResponse:
        return _detail(404, "job not found: unknown id, expired, or created with another API key")

    @app.exception_handler(ImageNotFound)
    async def _no_image(request: Request, exc: ImageNotFound) -> JSONResponse:
        return _detail(404, str(exc))

    @app.exception_handler(JobConflict)
    async def _conflict(request: Request, exc: JobConflict) -> JSONResponse:
        return _detail(409, str(exc))

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return _detail(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(ModelUnavailable)
    async def _model_unavailable(request: Request, exc: ModelUnavailable) -> JSONResponse:
        return _detail(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        return _detail(
            503,
            redis_trouble(exc, f"{request.method} {request.url.path}"),
            {"Retry-After": str(retry_after_s)},
        )


class CatchAllMiddleware:
    """Answers JSON 500 for any exception the handlers above did not take, and logs it once.

    A pure ASGI middleware rather than an `Exception` handler: Starlette re-raises after such a
    handler, so the traceback would be logged twice and the request metrics would miss the 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for a clean answer: the server closes the connection
                raise
            await _detail(500, "internal server error (logged)")(scope, receive, send)
