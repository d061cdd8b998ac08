"""What a worker publishes about itself in Redis, for the API (defaults, readiness, metrics)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from schemas.loras import LoraInfo


class EngineStats(BaseModel):
    """Counters since the worker started; the API exports them to Prometheus."""

    unet_calls: int = 0
    unet_rows: int = 0  # sum over UNet calls of the rows in the call (CFG counts 2 per image)
    unet_requests: int = 0  # sum over UNet calls of the requests sharing the call
    max_requests_per_call: int = 0
    last_batch_rows: int = 0
    jobs_succeeded: int = 0
    jobs_failed: int = 0
    jobs_canceled: int = 0
    images_generated: int = 0
    jobs_requeued: int = 0  # handed back to the queue by a draining worker (SIGTERM)
    oom_splits: int = 0  # out-of-memory errors answered by splitting a UNet call
    call_rows_limit: int = 0  # current most rows per UNet call (halved by each out-of-memory split)
    jobs_in_engine: int = 0  # jobs the engine holds now (running or waiting to join the batch)


class WorkerInfo(BaseModel):
    name: str
    model: str
    native_width: int
    native_height: int
    # the model's family (models/families): "sd" (SD 1.x/2.x) or "sdxl"; one worker serves one
    family: str = "sd"
    size_multiple: int = 8  # width and height must be multiples of this (the API's 8 and the VAE's)
    # the model's own recommended settings (from its folder's defaults.json), used by the API for
    # requests that leave them out; None: the API's SD_DEFAULT_STEPS / SD_DEFAULT_GUIDANCE_SCALE
    default_steps: int | None = None
    default_guidance_scale: float | None = None
    default_sampler: str | None = None
    default_scheduler: str | None = None
    # the samplers it runs (schemas/samplers.py names); empty: every one (a worker predating the list)
    samplers: list[str] = Field(default_factory=list)
    device: str
    dtype: str
    max_batch_rows: int
    slots: int
    started_at: float
    heartbeat_at: float
    heartbeat_interval_s: float
    # how the UNet runs: "fast (...)", "plain", or "plain (fell back: why)" when the fast path failed
    fast_path: str = "plain"
    stats: EngineStats = Field(default_factory=EngineStats)
    # the LoRA files of its SD_LORA_DIR (re-read every 30 s), and how many one request may apply (0: it
    # serves no LoRAs)
    loras: list[LoraInfo] = Field(default_factory=list)
    max_loras_per_request: int = 0
