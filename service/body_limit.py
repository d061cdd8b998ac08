"""413 for request bodies over SD_MAX_BODY_BYTES (SD_MAX_UPLOAD_BYTES on the routes that take images),
whether announced by Content-Length or streamed. On the OpenAI-compatible routes (`openai_prefix`) the
answer is in OpenAI's error shape, so OpenAI's clients raise their usual error.

The body is read here, up to the limit, before the app sees it: a chunked upload without
Content-Length is counted as it arrives and cut off at the limit, never buffered whole.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.openai_errors import NO_RETRY, OpenAIError


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        upload_paths: frozenset[str] = frozenset(),
        max_upload_bytes: int | None = None,
        openai_prefix: str | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_paths = upload_paths  # where bodies carry images: max_upload_bytes applies
        self.max_upload_bytes = max_upload_bytes if max_upload_bytes is not None else max_body_bytes
        self.openai_prefix = openai_prefix

    def _too_large(self, path: str, limit: int, setting: str) -> JSONResponse:
        message = f"request body too large: at most {limit} bytes ({setting})"
        if self.openai_prefix is not None and path.startswith(self.openai_prefix):
            return OpenAIError(413, message, code="request_too_large", headers=NO_RETRY).response()
        return JSONResponse({"detail": message}, status_code=413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in self.upload_paths:
            limit, setting = self.max_upload_bytes, "SD_MAX_UPLOAD_BYTES"
        else:
            limit, setting = self.max_body_bytes, "SD_MAX_BODY_BYTES"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:  # the server rejects malformed lengths; be safe if one gets through
                too_large = True
            if too_large:
                await self._too_large(path, limit, setting)(scope, receive, send)
                return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(path, limit, setting)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_message: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body_message], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive() that hands out `messages` first, then defers to the server's."""
    pending = list(messages)

    async def replay_receive() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay_receive
