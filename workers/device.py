"""Settings that depend on the device, resolved once torch can say which device we have.

Defaults: CUDA when available, float16 there (float32 on CPU); 64 UNet rows in flight on CUDA, 8 on
CPU; VAE decode 8 latents per call on CUDA, 4 on CPU; slots (jobs in flight) = max rows / 2, enough
to fill the batch with one-image guided requests without hoarding jobs other workers could take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.settings import WorkerSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    max_batch_rows: int
    vae_batch: int
    slots: int


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
    vae_dtype = dtype if settings.vae_dtype == "auto" else DTYPES[settings.vae_dtype]
    max_rows = settings.max_batch_rows or (64 if on_gpu else 8)
    return Runtime(
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        max_batch_rows=max_rows,
        vae_batch=settings.vae_batch or (8 if on_gpu else 4),
        slots=settings.slots or max(1, max_rows // 2),
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
