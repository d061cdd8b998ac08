"""GET /v1/jobs/{id}/events: a job's life as server-sent events, for clients that listen instead of poll.

    event: queued      data: {"id", "status": "queued", "queue_position", "progress", ...}
    event: progress    data: {"id", "status": "running", "progress": {step, total_steps}, "preview_url", ...}
    event: succeeded | failed | canceled    data: the job document (GET /v1/jobs/{id}); the stream ends

How the events are made: the stream polls Redis, asynchronously (no thread held per stream), every
POLL_S: one pipelined round trip reads what a client could see change (job_wait.job_fingerprint:
RQ status, progress, place in the queue, cancel, preview). Only when that changed (and, while the job
is queued, every QUEUED_REFRESH_S, for the jobs ahead leaving the workers' waiting lists) is the full
snapshot built, in the thread pool (RQ is synchronous), and an event sent if it differs from the last
one. Subscribing to something the worker publishes would save the polls but cost a Redis connection
per stream and a change to the worker; a few reads a second per stream is cheap.

Event ids grow with (status, step): `0.<queue position>`, `1.<step>`, `2` (the end). A client that
reconnects with `Last-Event-ID` gets the current state only if it differs from the event it saw last,
and once it saw the end, 204 (which tells an EventSource to stop reconnecting). A comment line every
SD_EVENTS_KEEPALIVE_S keeps proxies from closing a quiet stream; after SD_EVENTS_MAX_S the server
closes it (the client resumes), so that long waits move between API processes and keys are checked
again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from schemas.queue import JobStatus
from service.api_models import JOB_VIEW_EXAMPLE
from service.deps import Owner, Services, ServicesDep
from service.job_status import TERMINAL
from service.job_store import JobNotFound, JobSnapshot, queue_key
from service.job_wait import job_fingerprint
from service.openapi_docs import error_responses
from service.routes.jobs import count_if_first_seen_finished, job_view

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a stream looks at its job (one pipelined Redis round trip)
QUEUED_REFRESH_S = 1.0  # a queued job's place is re-read this often even when nothing else changed
RECONNECT_MS = 1000  # `retry:` hint: how soon an EventSource reconnects after a dropped connection
FINAL_ID = "2"

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

STREAM_EXAMPLE = (
    "retry: 1000\n\n"
    'id: 0.1\nevent: queued\ndata: {"id": "3f2c...", "status": "queued", "queue_position": 1, ...}\n\n'
    'id: 1.12\nevent: progress\ndata: {"id": "3f2c...", "status": "running", "progress": {"step": 12, '
    '"total_steps": 30}, "preview_url": null, "cancel_requested": false}\n\n'
    ": keep-alive\n\n"
    f"id: 2\nevent: succeeded\ndata: {json.dumps(JOB_VIEW_EXAMPLE)}\n\n"
)


# One event as OpenAPI (before 3.2) describes the items of an event stream.
EVENT_SCHEMA = {
    "type": "object",
    "required": ["data", "event", "id"],
    "properties": {
        "event": {"enum": ["queued", "progress", *(status.value for status in sorted(TERMINAL))]},
        "id": {"type": "string", "pattern": r"^(0\.[0-9]+|1\.[0-9]+|2)$"},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "retry": {"type": "integer"},
    },
}


class ServerStopping:
    """Whether the server was asked to stop (SIGTERM, SIGINT). A graceful shutdown waits for every open
    response: open streams end at their next poll instead of lasting up to SD_EVENTS_MAX_S, and their
    clients resume on another API process, or on this one restarted."""

    def __init__(self) -> None:
        self.stopping = False

    def chain_signal_handlers(self) -> None:
        """At start-up (the server has installed its own handlers by then): on SIGINT and SIGTERM, note
        it, then run the server's handler. Nothing where the handlers are not Python's (no server)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue

            def handler(number: int, frame: FrameType | None, previous: Callable = previous) -> None:
                self.stopping = True
                previous(number, frame)

            signal.signal(signum, handler)


def event_id(snap: JobSnapshot) -> str:
    """Grows with (status, step); equal ids mean the client saw this very state."""
    if snap.status is JobStatus.QUEUED:
        return f"0.{snap.queue_position or 0}"
    if snap.status is JobStatus.RUNNING:
        return f"1.{snap.step}"
    return FINAL_ID


def event_of(snap: JobSnapshot) -> tuple[str, str, dict[str, Any]]:
    """(id, event name, data) of the job's current state."""
    view = job_view(snap).model_dump(mode="json")
    if snap.status in TERMINAL:
        return event_id(snap), snap.status.value, view
    name = "queued" if snap.status is JobStatus.QUEUED else "progress"
    keys = ("id", "status", "queue_position", "progress", "preview_url", "cancel_requested")
    return event_id(snap), name, {key: view[key] for key in keys}


def format_event(event_id_: str, name: str, data: dict[str, Any]) -> str:
    return f"id: {event_id_}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def current(services: Services, job_id: str, owner: str) -> JobSnapshot:
    """Thread pool: the job's snapshot (an ended one counted in the metrics once)."""
    snap = services.store.snapshot(services.store.find(job_id, owner))
    count_if_first_seen_finished(services, snap)
    return snap


async def stream(
    services: Services, request: Request, job_id: str, owner: str, first: JobSnapshot, seen: str | None
) -> AsyncIterator[str]:
    """The events of one job until it ends, the client leaves, or Redis fails (the client reconnects)."""
    yield f"retry: {RECONNECT_MS}\n\n"
    keepalive_s = services.settings.events_keepalive_s
    stopping: ServerStopping = request.app.state.server_stopping
    close_at = time.monotonic() + services.settings.events_max_s
    queue = queue_key(first.params.model)  # the job's model's queue
    snap: JobSnapshot | None = first
    last_write = last_read = time.monotonic()
    fingerprint: tuple[object, ...] | None = None
    try:
        while True:
            if snap is not None:
                event = event_of(snap)
                if event[0] != seen:
                    yield format_event(*event)
                    seen = event[0]
                    last_write = time.monotonic()
                if snap.status in TERMINAL:
                    return
                snap = None
            if time.monotonic() - last_write >= keepalive_s:
                yield ": keep-alive\n\n"
                last_write = time.monotonic()
            await asyncio.sleep(POLL_S)
            if await request.is_disconnected() or time.monotonic() >= close_at or stopping.stopping:
                return  # past SD_EVENTS_MAX_S, or the server stops: the client resumes with Last-Event-ID
            latest = await job_fingerprint(services.redis.aio, job_id, queue)
            now = time.monotonic()
            queued = seen is not None and seen.startswith("0.")
            if latest != fingerprint or (queued and now - last_read >= QUEUED_REFRESH_S):
                fingerprint, last_read = latest, now
                snap = await run_in_threadpool(current, services, job_id, owner)
    except JobNotFound:
        log.info("job %s expired or was deleted while a client listened to its events", job_id)
    except RedisError as error:
        log.warning(
            "events of job %s: Redis failed (%s); the stream ends, the client reconnects", job_id, error
        )


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    summary="A job's status as server-sent events",
    description="`queued` (with the place in the queue), `progress` (step, total steps, preview URL when "
    "the job asked for previews), then one of `succeeded`, `failed` or `canceled` carrying the job "
    "document (as GET /v1/jobs/{id}), and the stream ends. Ids grow with (status, step): reconnect with "
    "`Last-Event-ID` to get only what is new (204 once the end was seen). A `: keep-alive` comment "
    "every SD_EVENTS_KEEPALIVE_S. Same API keys as the job.",
    responses={
        200: {
            "description": "The event stream: each event's `data` is JSON (see the description).",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA, "example": STREAM_EXAMPLE}},
        },
        204: {"description": "`Last-Event-ID` was the final event: nothing more will come."},
        **error_responses(401, 404, 503),
    },
)
async def job_events(
    job_id: str,
    owner: Owner,
    services: ServicesDep,
    request: Request,
    last_event_id: Annotated[
        str | None, Header(description="The id of the last event received, to resume after it.")
    ] = None,
) -> Response:
    first = await run_in_threadpool(current, services, job_id, owner)  # 404 before any stream
    seen = last_event_id.strip() if last_event_id else None
    if seen == FINAL_ID and first.status in TERMINAL:
        return Response(status_code=204)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer the stream
    return StreamingResponse(
        stream(services, request, job_id, owner, first, seen), media_type="text/event-stream", headers=headers
    )
