"""`python -m models.txt2img`, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from models.loading import load_model
from models.pipeline import generate
from schemas.generation import Generation

ROOT = Path(__file__).resolve().parents[2]


def txt2img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "models.txt2img", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_several_images_with_parameters(tmp_path: Path, random_models: dict[str, Path]) -> None:
    out = tmp_path / "pics" / "cat.png"
    result = txt2img(
        "--model", str(random_models["sd1_file"]),  # a single file: configs detected (SD1 -> shipped 1.5 configs)
        "--prompt", "a cat", "--negative-prompt", "a dog", "--width", "72", "--height", "64", "--steps", "4",
        "--guidance-scale", "5", "--eta", "0.5", "--seed", "11", "--num-images", "2", "--device", "cpu",
        "--dtype", "float32", "--out", str(out),
    )  # fmt: skip
    # the shipped SD 1.5 configs do not fit the tiny weights: a clear error, exit 2
    assert result.returncode == 2, result.stderr
    assert "does not fit" in result.stderr or "do not match" in result.stderr

    result = txt2img(
        "--model", str(random_models["sd1"]), "--prompt", "a cat", "--negative-prompt", "a dog",
        "--width", "72", "--height", "64", "--steps", "4", "--guidance-scale", "5", "--eta", "0.5",
        "--seed", "11", "--num-images", "2", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = [tmp_path / "pics" / "cat-0.png", tmp_path / "pics" / "cat-1.png"]
    assert all(f.is_file() for f in files) and not out.exists()
    expected = generate(
        load_model(random_models["sd1"]),
        Generation(
            prompt="a cat",
            negative_prompt="a dog",
            width=72,
            height=64,
            steps=4,
            guidance_scale=5,
            eta=0.5,
            seed=11,
            num_images=2,
        ),
    )
    for index, (path, pixels) in enumerate(zip(files, expected, strict=True)):
        image = Image.open(path)
        assert image.size == (72, 64)
        assert image.text["parameters"] == (
            "a cat\nNegative prompt: a dog\n"
            f"Steps: 4, Sampler: DDIM, CFG scale: 5, Seed: {11 + index}, Size: 72x64, Model: sd1, Eta: 0.5"
        )
        assert np.abs(np.asarray(image.convert("RGB")).astype(int) - pixels.astype(int)).max() <= 1


def test_one_image_default_size_and_random_seed(tmp_path: Path, random_models: dict[str, Path]) -> None:
    out = tmp_path / "one.png"
    result = txt2img("--model", str(random_models["sd2"]), "--prompt", "x", "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (64, 64)  # the tiny model's native size
    assert "Seed: " in image.text["parameters"] and "Model: sd2" in image.text["parameters"]


def test_errors_are_clear(tmp_path: Path, random_models: dict[str, Path]) -> None:
    missing = txt2img("--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "a.png"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad_size = txt2img(
        "--model",
        str(random_models["sd1"]),
        "--prompt",
        "x",
        "--width",
        "70",
        "--out",
        str(tmp_path / "b.png"),
    )
    assert bad_size.returncode == 2 and "width must be a positive multiple of 8" in bad_size.stderr
    assert "Traceback" not in missing.stderr + bad_size.stderr


def test_steps_and_guidance_default_to_the_models_recommendation(
    tmp_path: Path, random_models: dict[str, Path]
) -> None:
    import json
    import shutil

    folder = Path(shutil.copytree(random_models["sd1"], tmp_path / "model"))
    (folder / "defaults.json").write_text(json.dumps({"steps": 3, "guidance_scale": 2.5}))
    out = tmp_path / "d.png"
    result = txt2img("--model", str(folder), "--prompt", "x", "--seed", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Steps: 3, Sampler: DDIM, CFG scale: 2.5" in Image.open(out).text["parameters"]
