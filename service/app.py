"""The FastAPI application: `create_app(settings)` builds one; `service.app:app` is the default one.

`uvicorn service.app:app` builds the default app on first access of `app` (module __getattr__),
so importing this module (tests, tools) reads no environment and connects to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import docs_assets
from service.auth import Authenticator
from service.body_limit import BodyLimitMiddleware
from service.deps import Services
from service.errors import CatchAllMiddleware, install_error_handlers
from service.job_store import JobStore
from service.metrics import ApiMetrics, RequestMetricsMiddleware
from service.openapi_docs import API_DESCRIPTION
from service.redis_clients import connect
from service.route_table import RouteTable
from service.routes import (
    a1111,
    events,
    img2img,
    jobs,
    loras,
    openai_images,
    ops,
    playground,
    samplers,
    txt2img,
)
from service.settings import ConfigurationError, Settings, get_settings
from service.webhooks import WebhookDeliverer

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"

# The routes whose bodies carry images: SD_MAX_UPLOAD_BYTES applies to them, SD_MAX_BODY_BYTES elsewhere.
UPLOAD_PATHS = frozenset({"/v1/img2img", "/v1/images/edits", "/sdapi/v1/img2img"})
OPENAI_BODY_PREFIX = "/v1/images/"  # the OpenAI-compatible routes that take bodies: errors in OpenAI's shape


# Requests that load balancers, Prometheus and polling clients repeat every few seconds: one access
# log line each would bury everything else (SD_LOG_POLLS=true keeps them).
QUIET_PATHS = re.compile(
    r"^/(healthz|readyz|metrics|sdapi/v1/progress|v1/jobs/[0-9a-f]{32}(/preview\.png|/events)?)(\?.*)?$"
)


class QuietProbesAndPolls(logging.Filter):
    """Drops uvicorn's access-log records of successful GETs of probes, metrics and job polls."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) < 5:
            return True
        _, method, path, _, status = args[:5]
        return not (
            method == "GET"
            and isinstance(path, str)
            and QUIET_PATHS.match(path)
            and status in (200, 304, 503)
        )


def configure_logging(level: str, log_polls: bool = False) -> None:
    """Give the service's loggers a handler when the server (uvicorn) configured none for the root,
    and quiet the access log's probes and polls (unless asked for)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(level)
    access = logging.getLogger("uvicorn.access")
    for existing in [f for f in access.filters if isinstance(f, QuietProbesAndPolls)]:
        access.removeFilter(existing)
    if not log_polls:
        access.addFilter(QuietProbesAndPolls())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_polls)
    clients = connect(settings)
    services = Services(
        settings=settings,
        redis=clients,
        store=JobStore(clients.sync, settings),
        metrics=ApiMetrics(),
        auth=Authenticator(settings.api_keys),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info(
            "API ready: queue limit %d, auth %s",
            settings.max_queue_depth,
            "on" if services.auth.enabled else "off",
        )
        server_stopping.chain_signal_handlers()  # event streams end when the server is told to stop
        # webhooks: a task of this event loop (service/webhooks.py), when the deployment enables them
        deliverer = WebhookDeliverer(services) if settings.webhook_allowed_hosts else None
        sweeping = asyncio.create_task(deliverer.run(), name="webhooks") if deliverer else None
        yield
        if sweeping is not None and deliverer is not None:
            sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping
            await deliverer.close()
        await clients.close()

    app = FastAPI(
        title="Stable Diffusion txt2img API",
        version=API_VERSION,
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # FastAPI's /docs and /redoc load from a CDN: docs_assets serves /docs offline
        redoc_url=None,
    )
    app.state.services = services
    server_stopping = app.state.server_stopping = events.ServerStopping()
    routers = [
        txt2img.build_router(settings),
        img2img.build_router(settings),
        jobs.router,
        events.router,
        openai_images.build_router(settings),
        a1111.build_router(settings),
        samplers.router,
        loras.router,
        ops.router,
        playground.router,
    ]
    for router in routers:
        app.include_router(router)
    app.mount("/static", playground.static_files(), name="static")
    docs_assets.install(app)
    route_table = RouteTable([*app.router.routes, *(route for router in routers for route in router.routes)])
    install_error_handlers(app, settings.retry_after_s, route_table)
    # Added innermost first: metrics see every answer, including 413s and the catch-all's 500s.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        upload_paths=UPLOAD_PATHS,
        max_upload_bytes=settings.max_upload_bytes,
        openai_prefix=OPENAI_BODY_PREFIX,
    )
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=services.metrics, route_table=route_table)
    return app


_default_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    """`service.app.app`: the app built from the environment, created on first access."""
    global _default_app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _default_app is None:
        try:
            _default_app = create_app(get_settings())
        except ConfigurationError as error:
            # A clean exit with the message, rather than a traceback, is what an operator needs here.
            raise SystemExit(f"sd-api: {error}") from None
    return _default_app
