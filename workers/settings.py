"""The worker's configuration: environment variables read once into one object.

Every variable but REDIS_URL carries the `SD_` prefix; names shared with the API mean the same
thing there. It extends the janitor's settings (workers/janitor.py, self-contained because the API
image ships that one file), so both processes agree on every shared variable and default.
Nothing here imports torch: the device-dependent defaults (`None` below) are resolved by
`workers.device` once the device is known. Invalid values stop the process at start-up with a
message naming the variable and its bounds.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator

from workers.janitor import ConfigurationError, JanitorSettings, load_settings_class

__all__ = ["ConfigurationError", "WorkerSettings", "get_settings", "load_settings"]

DType = Literal["auto", "float32", "float16", "bfloat16"]


class WorkerSettings(JanitorSettings):
    # --- the model -------------------------------------------------------------------------------
    model: str | None = Field(
        None, description="model folder or checkpoint file (default: the embedded model)"
    )
    model_name: str | None = Field(
        None, description="name published and written in PNGs (default: file name)"
    )
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: DType = Field(
        "auto", description="UNet and text encoder dtype; auto: float16 on cuda, else float32"
    )
    vae_dtype: DType = Field(
        "auto", description="VAE dtype; auto: same as SD_DTYPE (float32 avoids fp16 VAE overflow)"
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for torch (default: torch's)"
    )
    warmup: bool = Field(True, description="run one tiny generation at start-up, before taking jobs")

    # --- batching --------------------------------------------------------------------------------
    slots: int | None = Field(
        None, ge=1, le=256, description="RQ slot threads: jobs in flight (default: max rows / 2)"
    )
    max_batch_rows: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="UNet rows in flight (CFG: 2 per image); default 64 on cuda, 8 on cpu",
    )
    vae_batch: int | None = Field(
        None, ge=1, le=256, description="latents per VAE decode call; default 8 cuda, 4 cpu"
    )

    # --- Redis lifetimes and liveness ------------------------------------------------------------
    result_ttl_s: int = Field(3600, ge=1, description="how long PNGs and progress stay in Redis")
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60, description="worker info + running jobs' heartbeat")
    drain_timeout_s: float = Field(60.0, ge=0, description="SIGTERM: time given to running jobs to finish")
    worker_name: str | None = Field(None, description="name in Redis (default: hostname-pid)")

    # TEST ONLY: every UNet call of more than this many rows raises a simulated out-of-memory error.
    test_oom_above_rows: int | None = Field(
        None, ge=1, description="TEST ONLY: simulate CUDA OOM above N rows"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "cpu", "cuda", "mps") and not (
            value.startswith("cuda:") and value[5:].isdigit()
        ):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    def resolved_worker_name(self) -> str:
        return self.worker_name or f"{socket.gethostname()}-{os.getpid()}"


def load_settings(**overrides: object) -> WorkerSettings:
    """Settings from the environment (and `overrides`), or ConfigurationError with a clear message."""
    return load_settings_class(WorkerSettings, **overrides)


@lru_cache(maxsize=1)
def get_settings() -> WorkerSettings:
    """The process's settings, read once; tests build their own with load_settings()."""
    return load_settings()
