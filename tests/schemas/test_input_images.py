"""The size an img2img request defaults to (schemas/input_images.py): the image's own, within limits."""

from __future__ import annotations

from schemas.input_images import default_size


def test_the_image_size_rounded_down_to_the_multiple() -> None:
    assert default_size(517, 383, 8) == (512, 376)
    assert default_size(5, 3, 8) == (8, 8)  # at least one multiple


def test_scaled_down_keeping_the_aspect_ratio_to_fit_the_limits() -> None:
    assert default_size(3000, 2000, 8, max_side=1024) == (1024, 680)
    assert default_size(2000, 2000, 8, max_pixels=512 * 512) == (512, 512)
    assert default_size(1024, 1024, 8, max_side=1024, max_pixels=1024 * 1024) == (1024, 1024)
    assert default_size(4000, 100, 8, max_side=1024, min_side=64) == (1024, 64)  # at least min_side
