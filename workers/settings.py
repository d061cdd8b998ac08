"""The worker's configuration: environment variables read once into one object.

It extends the variables the worker shares with the janitor and the API (schemas/settings.py), so
every process agrees on each shared variable and its default. Nothing here imports torch: the device-dependent defaults (`None` below) are resolved by
`workers.device` once the device is known. Invalid values stop the process at start-up with a
message naming the variable and its bounds.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, field_validator, model_validator

from schemas.model_names import check_model_name
from schemas.settings import ConfigurationError, LivenessSettings
from schemas.settings import load_settings as load_settings_class

__all__ = ["ConfigurationError", "WorkerSettings", "load_settings"]

DType = Literal["auto", "float32", "float16", "bfloat16"]
SdpaBackend = Literal["flash", "efficient", "cudnn", "math", "auto"]
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class WorkerSettings(LivenessSettings):
    # --- the model -------------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="model folder, checkpoint file, or Hugging Face hub id `org/name[@revision]` (fetched "
        "once into the hub's cache; see HF_TOKEN, HF_HUB_OFFLINE) (default: the embedded model)",
    )
    model_config_dir: str | None = Field(
        None,
        description="single-file checkpoints: a diffusers-format folder of configs (default: the shipped "
        "SD 1.5 / SD 2.1 ones, chosen from the keys; set it e.g. for SD 2.x base, which is epsilon)",
    )
    model_name: str | None = Field(
        None,
        description="the model's name: what requests' `model` names, its queue, written in PNGs; letters, "
        "digits, . _ - (default: the hub repo's, file's or folder's name)",
    )
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: DType = Field(
        "auto", description="UNet and text encoder dtype; auto: float16 on cuda, else float32"
    )
    vae_dtype: DType = Field(
        "auto",
        description="VAE dtype; auto: on cuda float16 with a float16 UNet (with the float32 fallback "
        "below), else float32; on cpu SD_DTYPE",
    )
    vae_float32_fallback: bool = Field(
        True,
        description="float16 VAE: keep a float32 copy of the decoder (~200 MB) and decode again in "
        "float32 the latents whose float16 decode overflows to inf/NaN (off: such a job fails)",
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for torch (default: torch's)"
    )
    warmup: bool = Field(
        True,
        description="before taking jobs: prepare the UNet's batch buckets (CUDA graphs, compile), run one "
        "tiny generation and, on CUDA, decode every VAE batch size once (off: the first jobs pay for "
        "all of it, a compile included)",
    )

    # --- the fast path on CUDA (models/accel.py); ignored on the CPU ---------------------------------
    cuda_graphs: bool = Field(
        True, description="cuda: replay the UNet as CUDA graphs, one per batch-size bucket"
    )
    cuda_graph_buckets: str = Field(
        "1,2,4,8,16,24,32,48,64",
        description="cuda: UNet row counts a call is padded up to (graphs, compile); more run eagerly",
    )
    cuda_graph_max: int = Field(
        16, ge=1, le=256, description="cuda: buckets kept captured (least recently used freed)"
    )
    channels_last: Literal["auto", "true", "false"] = Field(
        "auto",
        description="cuda: UNet and VAE convolutions in channels_last; auto: with SD_COMPILE only (1.05x "
        "compiled, 0.9x eager on an H100)",
    )
    vae_channels_last: Literal["auto", "true", "false"] = Field(
        "auto",
        description="cuda: the VAE's convolutions in channels_last; auto: as SD_CHANNELS_LAST",
    )
    sdpa_backend: SdpaBackend = Field(
        "auto", description="cuda: UNet attention kernel (auto: PyTorch's choice, cuDNN on an H100)"
    )
    compile: CompileMode = Field(
        "default",
        description="cuda: torch.compile mode of the UNet (1.3x at batch 16 on an H100; about 2 minutes "
        "of start-up, less with the inductor cache kept), off for a start in seconds",
    )
    compile_dynamic_batch: bool = Field(
        True,
        description="cuda, with SD_COMPILE: one compiled graph for every batch bucket (batch size "
        "symbolic; 1 row apart) instead of one compile per bucket",
    )
    compile_conv_1x1_as_mm: bool = Field(
        False,
        description="cuda, with SD_COMPILE: inductor lowers 1x1 convolutions to matmuls, fused with "
        "their neighbours (0.96x for SD 1.5 at batch 16 on an H100)",
    )
    compile_autotune_matmuls: bool = Field(
        False,
        description="cuda, with SD_COMPILE: inductor benchmarks Triton matmul templates against cuBLAS "
        "for each matmul, convolutions staying cuDNN's (longer compile; not yet measured on a GPU)",
    )
    compile_vae: bool = Field(
        False,
        description="cuda: torch.compile the VAE decoder too (native size; about a minute more of "
        "start-up; not yet measured on a GPU)",
    )
    fuse_projections: bool = Field(
        False,
        description="cuda: one matmul for each attention's q, k and v (k and v for cross-attention), "
        "UNet and VAE, same outputs (not yet measured on a GPU)",
    )
    compile_sizes: Literal["native", "all"] = Field(
        "native",
        description="cuda, with SD_COMPILE: compile the native size's buckets at warm-up (other sizes, "
        "and calls mixing prompts of different chunk counts, run uncompiled), or everything at its "
        "first use (which stalls the batch while it compiles)",
    )
    tf32: bool = Field(True, description="cuda: TF32 for float32 matmuls and convs (e.g. the VAE)")
    cudnn_benchmark: bool = Field(True, description="cuda: cuDNN autotuning per shape")
    text_batch: int = Field(64, ge=1, le=1024, description="prompt chunks per text-encoder call")

    # --- LoRAs (models/lora/) --------------------------------------------------------------------
    lora_dir: str | None = Field(
        None,
        description="folder of LoRA files (*.safetensors, kohya or diffusers/PEFT names) requests name by "
        "file name; unset: no LoRAs",
    )
    lora_slots: int = Field(
        8,
        ge=1,
        le=256,
        description="with SD_LORA_DIR: LoRAs held on the device at once (different LoRAs in one batch); "
        "a slot is reused only when no running image uses its LoRA",
    )
    lora_max_rank: int = Field(
        64,
        ge=1,
        le=1024,
        description="with SD_LORA_DIR: the largest LoRA rank the device slots take (memory: slots x rank x "
        "the adapted layers' widths)",
    )

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
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60, description="worker info + running jobs' heartbeat")
    drain_timeout_s: float = Field(60.0, ge=0, description="SIGTERM: time given to running jobs to finish")
    redis_outage_wait_s: float = Field(
        600.0,
        gt=0,
        description="while Redis is unreachable or full: how long finished results and job bookkeeping "
        "wait in the worker before the job goes back to the queue",
    )
    result_buffer_mb: int = Field(
        512, ge=1, description="while Redis is unreachable or full: most MB of finished PNGs kept waiting"
    )
    worker_name: str | None = Field(None, description="name in Redis (default: hostname-pid)")

    # TEST ONLY: every UNet call of more than this many rows raises a simulated out-of-memory error.
    test_oom_above_rows: int | None = Field(
        None, ge=1, description="TEST ONLY: simulate CUDA OOM above N rows"
    )

    @field_validator("model_name")
    @classmethod
    def _check_model_name(cls, value: str | None) -> str | None:
        value = value.strip() if value else None
        return None if not value else check_model_name(value)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "cpu", "cuda", "mps") and not (
            value.startswith("cuda:") and value[5:].isdigit()
        ):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("channels_last", "vae_channels_last", mode="before")
    @classmethod
    def _channels_last_words(cls, value: object) -> object:
        """auto, or any way of saying yes or no a boolean setting takes (true/false, 1/0, yes/no, on/off)."""
        words = {"1": "true", "yes": "true", "y": "true", "on": "true", "t": "true"}
        words |= {"0": "false", "no": "false", "n": "false", "off": "false", "f": "false"}
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str):
            value = value.strip().lower()
            return words.get(value, value)
        return value

    @field_validator("cuda_graph_buckets")
    @classmethod
    def _check_buckets(cls, value: str) -> str:
        return ",".join(str(b) for b in parse_buckets(value))

    @model_validator(mode="after")
    def _check_liveness(self) -> WorkerSettings:
        """A live worker must never look dead: its running jobs would be retried while they still run."""
        beat = self.heartbeat_interval_s
        problems = [
            f"{name}={value:g} must be at least 3 x SD_HEARTBEAT_INTERVAL_S ({3 * beat:g})"
            for name, value in (
                ("SD_JOB_HEARTBEAT_TTL_S", self.job_heartbeat_ttl_s),
                ("SD_WORKER_STALE_S", self.worker_stale_s),
            )
            if value < 3 * beat
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_loras(self) -> WorkerSettings:
        """LoRA adapters sit on the attention's own q/k/v layers, which fusing replaces."""
        if self.lora_dir and self.fuse_projections:
            raise ValueError("SD_LORA_DIR and SD_FUSE_PROJECTIONS do not go together yet: unset one")
        if self.lora_dir and self.lora_slots < self.max_loras_per_request:
            raise ValueError(
                f"SD_LORA_SLOTS={self.lora_slots} must be at least SD_MAX_LORAS_PER_REQUEST="
                f"{self.max_loras_per_request} (a request's LoRAs must fit in the pool at once)"
            )
        return self

    def resolved_worker_name(self) -> str:
        return self.worker_name or f"{socket.gethostname()}-{os.getpid()}"


def parse_buckets(text: str) -> tuple[int, ...]:
    """Parse "1,2,4,8" into (1, 2, 4, 8): increasing positive integers, else ValueError."""
    try:
        buckets = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError as error:
        raise ValueError(f"must be comma-separated integers, got {text!r}") from error
    if not buckets or buckets[0] < 1 or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"must be increasing positive integers, got {text!r}")
    return buckets


def load_settings(**overrides: object) -> WorkerSettings:
    """Settings from the environment (and `overrides`), or ConfigurationError with a clear message."""
    return load_settings_class(WorkerSettings, **overrides)
