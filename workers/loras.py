"""The worker's LoRAs: the pool and library built from SD_LORA_DIR, and the listing it publishes.

The pool replaces the UNet's adaptable layers, so it is built right after the model is loaded, before
the fast path compiles or captures the UNet (workers/main.py). The listing (schemas/loras.py:
LoraInfo, from each file's header) rides in the worker's heartbeat (WorkerInfo.loras), read again
every LORA_RESCAN_S so files added to the folder become nameable without a restart.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from models.lora.library import LoraLibrary
from models.lora.pool import LoraPool
from models.stable_diffusion import StableDiffusion
from schemas.loras import LoraInfo
from workers.settings import ConfigurationError, WorkerSettings

log = logging.getLogger(__name__)

LORA_RESCAN_S = 30.0


def build_library(settings: WorkerSettings, model: StableDiffusion) -> LoraLibrary | None:
    """The LoRA library of SD_LORA_DIR for `model` (None when unset); ConfigurationError when the folder
    is missing."""
    if not settings.lora_dir:
        return None
    folder = Path(settings.lora_dir).expanduser()
    if not folder.is_dir():
        raise ConfigurationError(f"SD_LORA_DIR: {folder} is not a folder")
    pool = LoraPool(model.unet, settings.lora_slots, settings.lora_max_rank)
    library = LoraLibrary(folder, model, pool, settings.max_loras_per_request)
    listing = library.listing()
    log.info(
        "LoRAs from %s: %d files, %d usable with this model",
        folder,
        len(listing),
        sum(1 for info in listing if info.usable),
    )
    return library


class Rescan:
    """The library's listing, read again at most every LORA_RESCAN_S."""

    def __init__(self, library: LoraLibrary) -> None:
        self.library = library
        self._last = time.monotonic()

    def due(self) -> list[LoraInfo] | None:
        """A fresh listing when it is time for one, else None."""
        now = time.monotonic()
        if now - self._last < LORA_RESCAN_S:
            return None
        self._last = now
        try:
            return self.library.listing()
        except OSError as error:
            log.warning("reading SD_LORA_DIR failed: %s", error)
            return None
