"""The embedded model is the default of `python -m models.txt2img`, and it draws what it is told."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import default_model
from models.default_model import EMBEDDED_MODEL_DIR, default_model_path
from training.checker import detect

ROOT = Path(__file__).resolve().parents[2]
MAX_WEIGHT_BYTES = 25 * 1024 * 1024


def test_the_embedded_model_is_the_default_and_fits_the_size_budget() -> None:
    assert default_model_path() == EMBEDDED_MODEL_DIR
    weights = sorted(EMBEDDED_MODEL_DIR.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert sum(w.stat().st_size for w in weights) <= MAX_WEIGHT_BYTES
    assert (EMBEDDED_MODEL_DIR / "MODEL_CARD.md").is_file()
    defaults = json.loads((EMBEDDED_MODEL_DIR / "defaults.json").read_text())
    assert defaults["steps"] >= 1 and defaults["guidance_scale"] > 1


@pytest.mark.parametrize(
    ("prompt", "colour", "shape", "position", "background"),
    [
        ("a red circle in the top left on a blue background", "red", "circle", "top left", "blue"),
        ("yellow square, bottom right, black background", "yellow", "square", "bottom right", "black"),
    ],
)
def test_txt2img_without_model_draws_what_is_asked(
    tmp_path: Path, prompt: str, colour: str, shape: str, position: str, background: str
) -> None:
    out = tmp_path / "shape.png"
    result = subprocess.run(
        [sys.executable, "-m", "models.txt2img", "--prompt", prompt, "--seed", "3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (64, 64)
    defaults = json.loads((EMBEDDED_MODEL_DIR / "defaults.json").read_text())
    assert f"Steps: {defaults['steps']}," in image.text["parameters"]
    found = detect(np.asarray(image.convert("RGB")))
    assert found is not None  # one shape on a plain background
    assert (found.colour, found.shape, found.position, found.background) == (
        colour,
        shape,
        position,
        background,
    ), found


def test_a_missing_embedded_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "EMBEDDED_MODEL_DIR", tmp_path / "embedded_model")
    with pytest.raises(FileNotFoundError, match="embedded default model is missing.*SD_MODEL"):
        default_model.default_model_path()
