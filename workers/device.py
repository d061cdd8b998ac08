"""Settings that depend on the device, resolved once torch can say which device we have.

Defaults: CUDA when available, float16 there (float32 on CPU), the VAE too, with a float32 copy
of its decoder for the rare latents whose float16 decode overflows (inf/NaN would be black
pictures; a float32 decode of every image cost ~8% of the time at batch 16 on an H100); 64 UNet rows
in flight on CUDA, 8 on CPU; VAE decode 8 latents per call on CUDA, 4 on CPU; slots (jobs in
flight) = max rows / 2, enough to fill the batch with one-image guided requests without hoarding
jobs other workers could take. On CUDA the UNet takes the fast path of models/accel.py (CUDA graphs
per batch bucket, compiled by torch.compile with a dynamic batch dimension, channels_last with it,
PyTorch's choice of attention kernel, TF32, cuDNN autotuning), each part switchable; on the CPU
it is called plainly, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.accel import AccelConfig
from workers.settings import WorkerSettings, parse_buckets

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    max_batch_rows: int
    vae_batch: int
    slots: int
    text_batch: int = 64
    vae_fallback: bool = False  # a float32 decoder for float16 decodes that overflow
    accel: AccelConfig | None = None  # None: the plain UNet call (the CPU)


def resolve_runtime(settings: WorkerSettings) -> Runtime:
    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"SD_DEVICE={settings.device}: no CUDA device is available")
    on_gpu = device.type != "cpu"
    if settings.dtype == "auto":
        dtype = torch.float16 if on_gpu else torch.float32
    else:
        dtype = DTYPES[settings.dtype]
    if settings.vae_dtype == "auto" and device.type == "cuda":
        vae_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    elif settings.vae_dtype == "auto":
        vae_dtype = dtype
    else:
        vae_dtype = DTYPES[settings.vae_dtype]
    max_rows = settings.max_batch_rows or (64 if on_gpu else 8)
    return Runtime(
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        max_batch_rows=max_rows,
        vae_batch=settings.vae_batch or (8 if on_gpu else 4),
        slots=settings.slots or max(1, max_rows // 2),
        text_batch=settings.text_batch,
        vae_fallback=settings.vae_float32_fallback and vae_dtype == torch.float16,
        accel=accel_config(settings) if device.type == "cuda" else None,
    )


def accel_config(settings: WorkerSettings) -> AccelConfig:
    """The UNet fast path as configured (CUDA only)."""
    return AccelConfig(
        channels_last=_switch(settings.channels_last, auto=settings.compile != "off"),
        sdpa_backend=settings.sdpa_backend,
        cuda_graphs=settings.cuda_graphs and settings.compile != "reduce-overhead",
        buckets=parse_buckets(settings.cuda_graph_buckets),
        max_graphs=settings.cuda_graph_max,
        compile_mode=settings.compile,
        compile_dynamic_batch=settings.compile_dynamic_batch,
        compile_conv_1x1_as_mm=settings.compile_conv_1x1_as_mm,
        compile_autotune_matmuls=settings.compile_autotune_matmuls,
        vae_channels_last=_switch(settings.vae_channels_last, auto=None),  # None: as the UNet
        compile_vae=settings.compile_vae,
        fuse_projections=settings.fuse_projections,
        tf32=settings.tf32,
        cudnn_benchmark=settings.cudnn_benchmark,
    )


def _switch(value: str, auto: bool | None) -> bool | None:
    """An auto/true/false setting as a boolean, `auto` standing for the given default."""
    return auto if value == "auto" else value == "true"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
