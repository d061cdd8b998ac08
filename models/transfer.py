"""Host-to-device copies that do not make the host wait for the GPU.

A plain `cpu_tensor.to("cuda")` copies from pageable memory and synchronizes the stream: the host
waits until every queued kernel has finished, so it cannot queue the next step's work meanwhile.
Copying from pinned memory with `non_blocking=True` is ordered on the stream like a kernel and
leaves the host free; PyTorch's pinned-memory cache keeps the source alive until the copy is done.
The values are the same either way.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`, copied without a host sync when it goes from the CPU to a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
