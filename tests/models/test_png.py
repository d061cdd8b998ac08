"""PNGs carry A1111's `parameters` text."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.png import encode_png, format_parameters, parameters_of, read_parameters


def test_parameters_in_a1111_format() -> None:
    text = format_parameters(
        prompt="a red circle",
        negative_prompt="blurry",
        steps=20,
        guidance_scale=7.5,
        seed=42,
        width=512,
        height=384,
        model="sd15",
    )
    assert (
        text
        == "a red circle\nNegative prompt: blurry\nSteps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x384, Model: sd15"
    )
    no_negative = format_parameters(
        prompt="p",
        negative_prompt="",
        steps=1,
        guidance_scale=1,
        seed=0,
        width=64,
        height=64,
        model="m",
        eta=0.5,
    )
    assert no_negative == "p\nSteps: 1, Sampler: DDIM, CFG scale: 1, Seed: 0, Size: 64x64, Model: m, Eta: 0.5"


@pytest.mark.parametrize("prompt", ["a red circle", "赤い丸"])
def test_png_round_trip(prompt: str) -> None:
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    png = encode_png(image, prompt)
    assert read_parameters(png) == prompt
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(decoded, image)


def test_rejects_wrong_array() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))


def test_the_sampler_and_schedule_as_automatic1111_writes_them() -> None:
    from schemas.generation import Generation

    text = parameters_of(Generation(prompt="p", sampler="DPM++ 2M Karras", steps=20, seed=3, eta=0.5), 3, "m")
    assert (
        text
        == "p\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3, Size: 512x512, Model: m"
    )
    text = parameters_of(Generation(prompt="p", sampler="euler_ancestral", steps=8, seed=1), 1, "m")
    assert "Sampler: Euler a, CFG scale" in text  # the model's own schedule: no "Schedule type"
