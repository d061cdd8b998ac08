"""The API's checks of uploaded images (service/input_images.py), without a server: formats, the pixel
limit read from the header, truncated files of each format, OpenAI's alpha masks."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.input_images import InputImageInvalid, alpha_mask, check_image, from_base64
from tests.support.input_images import box_mask, encoded, init_picture

LIMIT = 100 * 100


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_each_format_is_read_from_its_header_and_a_cut_file_is_refused(image_format: str) -> None:
    data = encoded(init_picture(64, 48), image_format)
    checked = check_image(data, "init_image", LIMIT)
    assert (checked.format, checked.size, checked.has_alpha) == (image_format, (64, 48), False)
    with pytest.raises(InputImageInvalid, match=f"init_image: the {image_format} file is truncated"):
        check_image(data[: len(data) - 20], "init_image", LIMIT)


def with_size(png: bytes, width: int, height: int) -> bytes:
    """`png` whose header (IHDR) claims width x height: what a decompression bomb's says."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def test_the_pixel_limit_holds_before_any_decoding() -> None:
    with pytest.raises(
        InputImageInvalid, match=r"mask_image: the image is 100x101 = 10100 pixels; at most 10000"
    ):
        check_image(encoded(np.zeros((101, 100), dtype=np.uint8)), "mask_image", LIMIT)
    small = encoded(np.zeros((8, 8), dtype=np.uint8))
    for width, height in ((5000, 5000), (100_000, 100_000)):  # under and over Pillow's own bomb limit
        with pytest.raises(InputImageInvalid, match="init_image: the image (is|has more than)"):
            check_image(with_size(small, width, height), "init_image", LIMIT)
    for data, words in ((b"", "the file is empty"), (b"GIF89a" + bytes(20), "not a PNG, JPEG or WebP")):
        with pytest.raises(InputImageInvalid, match=words):
            check_image(data, "init_image", LIMIT)


def test_base64_with_or_without_a_data_url_prefix() -> None:
    assert from_base64("data:image/png;base64,aGVsbG8=", "init_image") == b"hello"
    assert from_base64(" aGVs\nbG8=\n", "init_image") == b"hello"  # wrapped, as `base64` writes it
    with pytest.raises(InputImageInvalid, match="init_images: not valid base64"):
        from_base64("hello!", "init_images")


def test_openai_masks_edit_where_alpha_is_zero() -> None:
    rgba = np.dstack([init_picture(32, 24), np.full((24, 32), 255, dtype=np.uint8)])
    rgba[..., 3][box_mask(32, 24) > 0] = 0
    mask = alpha_mask(check_image(encoded(rgba), "mask", LIMIT), "mask")
    assert mask is not None and mask.size == (32, 24)
    with Image.open(io.BytesIO(mask.data)) as image:
        assert image.mode == "L" and np.array_equal(np.asarray(image), box_mask(32, 24))
    opaque = check_image(
        encoded(np.dstack([init_picture(8, 8), np.full((8, 8), 255, np.uint8)])), "image", LIMIT
    )
    assert alpha_mask(opaque, "image", required=False) is None  # nothing transparent: nothing to edit
    rgb = check_image(encoded(init_picture(8, 8)), "mask", LIMIT)
    assert alpha_mask(rgb, "image", required=False) is None
    with pytest.raises(InputImageInvalid, match="mask: the mask needs an alpha channel"):
        alpha_mask(rgb, "mask")
