"""Operational routes: /healthz, /readyz, /metrics. Async, with redis.asyncio; never authenticated."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from service.api_models import Health, Readiness
from service.deps import ServicesDep
from service.live_workers import live_workers
from service.metrics import QueueState

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: Redis answers and at least one worker is alive",
    responses={503: {"model": Readiness, "description": "Not ready: `detail` says what is missing."}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    client = services.redis.aio
    try:
        await client.ping()
        workers = await live_workers(client, services.settings.worker_stale_s)
    except RedisError:
        ready = Readiness(ready=False, redis=False, workers_alive=0, detail="Redis is unreachable")
        return JSONResponse(ready.model_dump(), status_code=503)
    if not workers:
        ready = Readiness(
            ready=False,
            redis=True,
            workers_alive=0,
            detail=f"no live worker (none with a heartbeat in the last {services.settings.worker_stale_s:g} s)",
        )
        return JSONResponse(ready.model_dump(), status_code=503)
    ready = Readiness(ready=True, redis=True, workers_alive=len(workers), detail="ready")
    return JSONResponse(ready.model_dump(), status_code=200)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "sd_queue_depth 3.0\n"}}}},
)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(await read_queue_state(services)), media_type=CONTENT_TYPE_LATEST)


async def read_queue_state(services: ServicesDep) -> QueueState:
    """Queue depth, running jobs and live workers; redis_up False when Redis does not answer."""
    client = services.redis.aio
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.llen(services.store.queue.key)
            pipe.zcard(services.store.started_key)
            depth, running = await pipe.execute()
        workers = await live_workers(client, services.settings.worker_stale_s)
    except RedisError:
        return QueueState(redis_up=False)
    return QueueState(redis_up=True, queue_depth=depth, jobs_running=running, workers=workers)
