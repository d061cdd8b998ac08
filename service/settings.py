"""The API's configuration: environment variables read once at start-up into one Settings object,
which extends the variables every process shares (schemas/settings.py)."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from schemas.generation import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WIDTH,
    GUIDANCE_SCALE_MAX,
    NUM_IMAGES_LIMIT,
    PROMPT_CHARS_LIMIT,
    SIZE_LIMIT,
    SIZE_MULTIPLE,
    STEPS_MAX,
)
from schemas.settings import CommonSettings, ConfigurationError
from schemas.settings import load_settings as load_settings_class


class Settings(CommonSettings):
    """The API's variables (beside the common ones: schemas/settings.py)."""

    redis_connect_timeout_s: float = Field(1.0, gt=0, le=60, description="per Redis connection attempt")
    redis_max_connections: int = Field(64, ge=4, le=10_000, description="sync pool size (thread-pool routes)")

    # Empty: no authentication. Keys are secrets: never logged, compared in constant time.
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field((), description="comma-separated API keys")

    max_queue_depth: int = Field(100, ge=1, description="queued jobs beyond which POST answers 429")
    retry_after_s: int = Field(10, ge=1, le=3600, description="Retry-After of 429 and 503 answers")
    max_body_bytes: int = Field(65_536, ge=1024, le=16 * 2**20, description="request body limit (413 beyond)")

    max_prompt_chars: int = Field(
        2000, ge=1, le=PROMPT_CHARS_LIMIT, description="prompt and negative_prompt length"
    )
    min_size: int = Field(64, ge=SIZE_MULTIPLE, description="smallest width/height in pixels")
    max_size: int = Field(1024, ge=SIZE_MULTIPLE, le=SIZE_LIMIT, description="largest width/height in pixels")
    max_pixels: int = Field(1024 * 1024, ge=SIZE_MULTIPLE**2, description="largest width x height")
    max_num_images: int = Field(8, ge=1, le=NUM_IMAGES_LIMIT, description="images per request")
    fallback_width: int = Field(
        DEFAULT_WIDTH, description="default width while no live worker publishes its model"
    )
    fallback_height: int = Field(
        DEFAULT_HEIGHT, description="default height while no live worker publishes its model"
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

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be empty or start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_sizes(self) -> Settings:
        problems = []
        for name in ("min_size", "max_size", "fallback_width", "fallback_height"):
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
        for name in ("fallback_width", "fallback_height"):
            if not self.min_size <= getattr(self, name) <= self.max_size:
                problems.append(
                    f"SD_{name.upper()}={getattr(self, name)} must lie in [SD_MIN_SIZE, SD_MAX_SIZE] = "
                    f"[{self.min_size}, {self.max_size}]"
                )
        if self.fallback_width * self.fallback_height > self.max_pixels:
            problems.append(
                f"SD_FALLBACK_WIDTH x SD_FALLBACK_HEIGHT must be <= SD_MAX_PIXELS={self.max_pixels}"
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
