"""TEST-ONLY fault injection, switched on by environment variables that production never sets.

SD_TEST_OOM_ABOVE_ROWS=N: every UNet call of more than N rows raises SimulatedOutOfMemory before
touching the model, exactly where a real CUDA out-of-memory error would surface, so the engine's
split-and-retry path can be tested on a CPU.
"""

from __future__ import annotations

import torch


class SimulatedOutOfMemory(torch.OutOfMemoryError):
    """Raised instead of running a UNet call that is too big for the simulated memory."""


def check_unet_call(rows: int, oom_above_rows: int | None) -> None:
    if oom_above_rows is not None and rows > oom_above_rows:
        raise SimulatedOutOfMemory(
            f"TEST ONLY (SD_TEST_OOM_ABOVE_ROWS={oom_above_rows}): simulated out of memory "
            f"for a UNet call of {rows} rows"
        )
