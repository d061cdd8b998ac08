"""Operational routes: /healthz, /readyz, /metrics. Async, with redis.asyncio; never authenticated."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from service.api_models import Health, Readiness
from service.deps import ServicesDep
from service.job_store import queue_key, started_key
from service.live_workers import known_models, live_workers
from service.metrics import ModelQueue, QueueState

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: Redis answers and at least one model has a live worker",
    description="Ready (200) when Redis answers and at least one model has a live worker: this API can "
    "then serve that model's requests. `models` gives each model served or known (a worker of it was "
    "seen in the last week) with its live workers: a model at 0 answers 503 to its requests.",
    responses={503: {"model": Readiness, "description": "Not ready: `detail` says what is missing."}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    client = services.redis.aio
    settings = services.settings
    try:
        await client.ping()
        workers = await live_workers(client, settings.worker_stale_s)
        models = dict.fromkeys(await known_models(client), 0)
    except RedisError:
        ready = Readiness(ready=False, redis=False, workers_alive=0, detail="Redis is unreachable")
        return JSONResponse(ready.model_dump(), status_code=503)
    for info in workers:
        models[info.model] = models.get(info.model, 0) + 1
    if settings.default_model:
        models.setdefault(settings.default_model, 0)
    models = dict(sorted(models.items()))
    if not workers:
        ready = Readiness(
            ready=False,
            redis=True,
            workers_alive=0,
            models=models,
            detail=f"no live worker (none with a heartbeat in the last {settings.worker_stale_s:g} s)",
        )
        return JSONResponse(ready.model_dump(), status_code=503)
    idle = [name for name, count in models.items() if count == 0]
    detail = "ready" + (f"; no live worker for model {', '.join(idle)}" if idle else "")
    ready = Readiness(ready=True, redis=True, workers_alive=len(workers), models=models, detail=detail)
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
    """Each model's queue depth and running jobs (every model served or known), and the live workers;
    redis_up False when Redis does not answer."""
    client = services.redis.aio
    try:
        workers = await live_workers(client, services.settings.worker_stale_s)
        names = sorted(set(await known_models(client)) | {info.model for info in workers})
        async with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(queue_key(name))
                pipe.zcard(started_key(name))
            replies = await pipe.execute()
    except RedisError:
        return QueueState(redis_up=False)
    models = {
        name: ModelQueue(depth=depth, running=running)
        for name, depth, running in zip(names, replies[0::2], replies[1::2], strict=True)
    }
    return QueueState(redis_up=True, models=models, workers=workers)
