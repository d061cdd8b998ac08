"""Where the default model lives: the embedded model shipped in the repo.

Until the embedded trained model is committed (models/embedded_model/), the default is a tiny random
SD 1.x-style model, built once into a cache folder on first use: everything runs, pictures are noise.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded_model"


def default_model_path() -> Path:
    """The embedded model folder, or a tiny random model built on first use."""
    if (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        return EMBEDDED_MODEL_DIR
    cache = Path(os.environ.get("SD_CACHE_DIR", Path.home() / ".cache" / "sdserve")) / "random-sd1"
    if not (cache / "model_index.json").is_file():
        from models.random_model import build_random_model  # only needed this once

        logger.warning("no embedded model found: building a tiny random model in %s", cache)
        # build beside it, then rename: a concurrent process never sees a half-written folder
        staging = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        build_random_model("sd1", staging)
        try:
            staging.rename(cache)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    return cache
