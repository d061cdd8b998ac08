"""What the three processes (API, worker, janitor) read from the environment in common, read once.

Each process extends `CommonSettings` with its own variables (service/settings.py,
workers/settings.py, workers/janitor.py), so a variable they share is declared here once, with one
default and one check. Every variable but REDIS_URL carries the `SD_` prefix. An invalid value
stops the process at start-up with a message that names the variable and the allowed range,
never echoing the value (API keys and Redis passwords are secrets).

Torch-free: the API image, which has no torch, imports it.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import redis
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.loras import DEFAULT_MAX_LORAS_PER_REQUEST, LORAS_LIMIT

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class ConfigurationError(RuntimeError):
    """The environment holds an invalid setting; the message names the variables."""


class CommonSettings(BaseSettings):
    """The variables every process reads."""

    model_config = SettingsConfigDict(env_prefix="SD_", populate_by_name=True, frozen=True, extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias="REDIS_URL",
        description="Redis holding queue and images: redis://[user:password@]host:port/db, rediss:// for "
        "TLS (CA file as ?ssl_ca_certs=PATH), or unix://",
    )
    redis_socket_timeout_s: float = Field(
        2.0, gt=0, le=60, description="per Redis command; a dead Redis fails fast"
    )
    result_ttl_s: int = Field(3600, ge=1, description="how long results, errors and PNGs stay in Redis")
    worker_stale_s: float = Field(30.0, gt=0, description="a worker whose heartbeat is older is not alive")
    log_level: str = Field("INFO", description="level of the service's own loggers")
    max_loras_per_request: int = Field(
        DEFAULT_MAX_LORAS_PER_REQUEST,
        ge=1,
        le=LORAS_LIMIT,
        description="LoRAs one request may apply, its <lora:...> prompt tags included (the API's 422 beyond)",
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"must start with {', '.join(REDIS_SCHEMES[:-1])} or {REDIS_SCHEMES[-1]}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level


class LivenessSettings(CommonSettings):
    """How the worker keeps its running jobs alive and the janitor finds those of dead workers."""

    job_heartbeat_ttl_s: int = Field(
        30,
        ge=2,
        le=3600,
        description="a running job not heartbeated this long is abandoned (janitor retries it)",
    )


S = TypeVar("S", bound=BaseSettings)


def env_name(field: str, alias: object = None) -> str:
    """The environment variable of a settings field."""
    return alias if isinstance(alias, str) else f"SD_{field.upper()}"


def describe_validation_error(error: ValidationError, cls: type[BaseSettings]) -> str:
    """One clause per bad variable, named as in the environment, without echoing values."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        info = cls.model_fields.get(field)
        name = env_name(field, info.validation_alias if info else None) if field else "settings"
        lines.append(f"{name}: {item['msg'].removeprefix('Value error, ')}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """`cls` from the environment (and `overrides`), or ConfigurationError naming each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as error:
        raise ConfigurationError(describe_validation_error(error, cls)) from None


def configure_logging(level: str) -> None:
    """The worker's and janitor's log format and level; RQ shows warnings only (our own lines say
    what matters). The API leaves the handlers to its server (service/app.py)."""
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric, format=LOG_FORMAT, force=True)
    rq_level = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for name in ("rq", "rq.worker", "rq.queue", "rq.job", "rq.registry"):
        logging.getLogger(name).setLevel(rq_level)


def redis_client(settings: CommonSettings, **options: Any) -> redis.Redis:
    """A client of the configured Redis (password, ACL user and TLS come with the URL)."""
    options.setdefault("socket_timeout", settings.redis_socket_timeout_s)
    options.setdefault("socket_connect_timeout", 2.0)
    return redis.Redis.from_url(settings.redis_url, **options)
