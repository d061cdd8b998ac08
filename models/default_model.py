"""Where the default model lives: the embedded model shipped in the repo (models/embedded_model/).

It is a small text-to-image model trained by `python -m training.train` on captioned pictures of
coloured shapes (see its MODEL_CARD.md): it needs no download and draws what it is told in about
a tenth of a second on a laptop CPU. Real Stable Diffusion checkpoints are set with SD_MODEL.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded_model"


def default_model_path() -> Path:
    """The embedded model folder; a clear error when the installation lacks it."""
    if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is missing from {EMBEDDED_MODEL_DIR} (an incomplete "
            "checkout or installation): reinstall the package, retrain it with "
            "`python -m training.train --out models/embedded_model`, or set SD_MODEL to a model"
        )
    return EMBEDDED_MODEL_DIR
