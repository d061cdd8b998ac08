"""The API's configuration: environment variables read once at start-up into one Settings object,
which extends the variables every process shares (schemas/settings.py)."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from schemas.generation import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_STEPS,
    GUIDANCE_SCALE_MAX,
    NUM_IMAGES_LIMIT,
    PROMPT_CHARS_LIMIT,
    SIZE_LIMIT,
    SIZE_MULTIPLE,
    STEPS_MAX,
)
from schemas.model_names import check_model_name
from schemas.settings import CommonSettings, ConfigurationError
from schemas.settings import load_settings as load_settings_class

WEBHOOK_SECRET_MIN_CHARS = 16
# An SD_WEBHOOK_ALLOWED_HOSTS entry other than an IP address: `*`, `*.domain` or a host name.
_ALLOWED_NAME = re.compile(r"^(\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)$")


def _allowed_host_entry(entry: str) -> bool:
    try:
        ipaddress.ip_address(entry)
        return True
    except ValueError:
        return bool(_ALLOWED_NAME.match(entry))


class Settings(CommonSettings):
    """The API's variables (beside the common ones: schemas/settings.py)."""

    redis_connect_timeout_s: float = Field(1.0, gt=0, le=60, description="per Redis connection attempt")
    redis_max_connections: int = Field(64, ge=4, le=10_000, description="sync pool size (thread-pool routes)")

    # Empty: no authentication. Keys are secrets: never logged, compared in constant time.
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field((), description="comma-separated API keys")

    max_queue_depth: int = Field(
        100, ge=1, description="queued jobs per model beyond which POST answers 429 for that model"
    )
    retry_after_s: int = Field(10, ge=1, le=3600, description="Retry-After of 429 and 503 answers")
    max_body_bytes: int = Field(65_536, ge=1024, le=16 * 2**20, description="request body limit (413 beyond)")
    # img2img and inpainting uploads (POST /v1/img2img, /v1/images/edits, /sdapi/v1/img2img): the body of
    # these routes may be this big (base64 in JSON adds a third); every input image is checked from its
    # header against max_input_pixels before anything decodes it (a decompression bomb stops there)
    max_upload_bytes: int = Field(
        20 * 2**20,
        ge=1024,
        le=256 * 2**20,
        description="body limit of the routes that take images (413 beyond)",
    )
    max_input_pixels: int = Field(
        4096 * 4096, ge=64 * 64, le=2**28, description="largest width x height of an input image (422 beyond)"
    )

    max_prompt_chars: int = Field(
        2000, ge=1, le=PROMPT_CHARS_LIMIT, description="prompt and negative_prompt length"
    )
    min_size: int = Field(64, ge=SIZE_MULTIPLE, description="smallest width/height in pixels")
    max_size: int = Field(1024, ge=SIZE_MULTIPLE, le=SIZE_LIMIT, description="largest width/height in pixels")
    max_pixels: int = Field(1024 * 1024, ge=SIZE_MULTIPLE**2, description="largest width x height")
    max_num_images: int = Field(8, ge=1, le=NUM_IMAGES_LIMIT, description="images per request")
    default_model: str | None = Field(
        None,
        description="model of the requests that name none (default: the only model served; with several "
        "and none set, such a request is a 422 naming them)",
    )
    default_steps: int = Field(
        DEFAULT_STEPS,
        ge=1,
        le=STEPS_MAX,
        description="steps when the request leaves them out and the model recommends none",
    )
    default_guidance_scale: float = Field(
        DEFAULT_GUIDANCE_SCALE,
        ge=0,
        le=GUIDANCE_SCALE_MAX,
        description="guidance when left out and the model recommends none",
    )

    job_timeout_s: int = Field(600, ge=1, description="RQ job_timeout: longest run of one job")
    job_retries: int = Field(1, ge=0, le=10, description="RQ Retry(max=...) when a worker dies mid-job")

    # OpenAI-compatible POST /v1/images/generations answers only once the job ended: bound that wait.
    openai_wait_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="`/v1/images/generations`: longest wait for the images; then 504 and the job is canceled",
    )
    log_polls: bool = Field(
        False, description="log every GET of /healthz, /readyz, /metrics and job polls (off: quiet)"
    )
    public_url: str = Field(
        "",
        description="base of absolute image URLs in OpenAI answers (behind a proxy); default: the request's",
    )

    # GET /v1/jobs/{id}/events: proxies close connections that stay silent for long (nginx: 60 s)
    events_keepalive_s: float = Field(
        15.0,
        gt=0,
        le=300,
        description="`/v1/jobs/{id}/events`: a comment line after this long without an event, so that "
        "proxies keep the stream open",
    )

    events_max_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="`/v1/jobs/{id}/events`: a stream is closed after this long (the client resumes with "
        "Last-Event-ID), so connections move between API processes and keys are checked again",
    )

    # Webhooks (service/webhooks.py). The secret signs every delivery: never logged.
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="comma-separated hosts a job's `webhook_url` may name: `*` (any host whose addresses "
        "are all public), a name or IP, `*.domain` (these two may be private, loopback or link-local); "
        "empty: webhooks off",
    )
    webhook_secret: str = Field(
        "",
        description="key of the webhooks' HMAC-SHA256 signatures; at least 16 characters, needed with "
        "SD_WEBHOOK_ALLOWED_HOSTS",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=120, description="one webhook POST: resolve, connect, send, read the status"
    )
    webhook_retry_for_s: float = Field(
        600.0,
        gt=0,
        description="a webhook that fails is retried (backoff 1 s, doubling up to 60 s) this long after "
        "its first try, then dropped (logged); less than SD_RESULT_TTL_S",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return tuple(str(host).strip().lower().rstrip(".") for host in value if str(host).strip())
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [host for host in value if not _allowed_host_entry(host)]
        if bad:
            raise ValueError(
                f"{', '.join(repr(host) for host in bad)}: each entry must be `*`, a host name or IP address "
                "(no scheme, port or path), or `*.domain`"
            )
        return value

    @field_validator("default_model", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("default_model")
    @classmethod
    def _check_default_model(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name(value.strip())

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be empty or start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_sizes(self) -> Settings:
        problems = []
        for name in ("min_size", "max_size"):
            if getattr(self, name) % SIZE_MULTIPLE:
                problems.append(
                    f"SD_{name.upper()}={getattr(self, name)} must be a multiple of {SIZE_MULTIPLE}"
                )
        if self.min_size > self.max_size:
            problems.append(f"SD_MIN_SIZE={self.min_size} must be <= SD_MAX_SIZE={self.max_size}")
        if self.max_pixels < self.min_size**2:
            problems.append(
                f"SD_MAX_PIXELS={self.max_pixels} must be >= SD_MIN_SIZE squared ({self.min_size**2})"
            )
        if self.webhook_allowed_hosts and len(self.webhook_secret) < WEBHOOK_SECRET_MIN_CHARS:
            problems.append(
                f"SD_WEBHOOK_SECRET must hold at least {WEBHOOK_SECRET_MIN_CHARS} characters when "
                "SD_WEBHOOK_ALLOWED_HOSTS is set (it signs every webhook)"
            )
        if self.webhook_retry_for_s >= self.result_ttl_s:
            problems.append(
                f"SD_WEBHOOK_RETRY_FOR_S={self.webhook_retry_for_s:g} must be less than SD_RESULT_TTL_S="
                f"{self.result_ttl_s} (a late delivery would find the job expired)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and `overrides`), or ConfigurationError with a clear message."""
    return load_settings_class(Settings, **overrides)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; tests build their own with load_settings() or clear the cache."""
    return load_settings()


__all__ = ["ConfigurationError", "Settings", "get_settings", "load_settings"]
