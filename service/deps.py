"""What routes receive through FastAPI's dependency injection (Annotated aliases)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from service.auth import Authenticator, bearer_scheme
from service.job_store import JobStore
from service.metrics import ApiMetrics
from service.redis_clients import RedisClients
from service.settings import Settings


@dataclass
class Services:
    """Everything one app instance holds; stored on `app.state.services`."""

    settings: Settings
    redis: RedisClients
    store: JobStore
    metrics: ApiMetrics
    auth: Authenticator


# `async def`: these do no I/O, and a sync dependency would cost a thread-pool hop per request.
async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_owner(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> str:
    return request.app.state.services.auth.owner(credentials)


ServicesDep = Annotated[Services, Depends(get_services)]
Owner = Annotated[str, Depends(get_owner)]
