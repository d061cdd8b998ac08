"""PNGs carry A1111's `parameters` text chunk; JPEG and WebP files carry A1111's parameters in the EXIF UserComment, as A1111 writes them (piexif's
"UNICODE" comment, type UNDEFINED); `read_parameters` reads all three formats back."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import ExifTags, Image

from models.image_files import (
    UNICODE_PREFIX,
    decode_user_comment,
    encode_image,
    encode_png,
    exif_user_comment,
    format_parameters,
    parameters_of,
    read_parameters,
)

TEXT = "a red circle, 日本の灯台\nNegative prompt: blurry\nSteps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42"


def picture(seed: int = 0, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Smooth gradients with a little noise: what lossy codecs are made for."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 64], axis=-1)
    return np.clip(rgb + rng.normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("image_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_each_format_round_trips_the_parameters(image_format: str, pil_format: str) -> None:
    pixels = picture()
    data = encode_image(pixels, image_format, TEXT, quality=90)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pil_format and image.size == (64, 48)
        decoded = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert read_parameters(data) == TEXT
    error = np.abs(decoded - pixels)
    assert error.mean() < (0.01 if image_format == "png" else 3.0), error.mean()


def test_jpeg_at_100_is_within_a_few_levels() -> None:
    pixels = picture(1)
    data = encode_image(pixels, "jpeg", None, quality=100)
    with Image.open(io.BytesIO(data)) as image:
        decoded = np.asarray(image.convert("RGB"), dtype=np.int16)
        assert image.info.get("exif") is None  # no parameters asked for, none written
    assert np.abs(decoded - pixels).max() <= 4


def test_lower_quality_makes_smaller_files() -> None:
    pixels = picture(2, (128, 128))
    for image_format in ("jpeg", "webp"):
        sizes = [len(encode_image(pixels, image_format, TEXT, quality=q)) for q in (100, 75, 10)]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > 2 * sizes[-1], (image_format, sizes)


def test_the_exif_block_is_what_automatic1111_writes() -> None:
    """A big-endian TIFF block: IFD0 points at the Exif IFD, whose one entry is UserComment (0x9286)
    of type UNDEFINED (7), "UNICODE\\0" then UTF-16 big-endian (piexif's UserComment.dump(...,
    encoding="unicode"), which A1111's reader, piexif.load + UserComment.load, decodes)."""
    block = exif_user_comment(TEXT)
    assert block.startswith(b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08")
    tiff = block[6:]
    (count,) = struct.unpack(">H", tiff[8:10])
    tag, kind, _, exif_ifd = struct.unpack(">HHII", tiff[10:22])
    assert (count, tag, kind) == (1, 0x8769, 4)
    tag, kind, length, offset = struct.unpack(">HHII", tiff[exif_ifd + 2 : exif_ifd + 14])
    assert (tag, kind) == (0x9286, 7)
    comment = tiff[offset : offset + length]
    assert comment == UNICODE_PREFIX + TEXT.encode("utf-16-be")

    data = encode_image(picture(), "jpeg", TEXT)
    with Image.open(io.BytesIO(data)) as image:
        raw = image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    assert raw == comment and decode_user_comment(raw) == TEXT


def test_user_comments_in_other_encodings() -> None:
    assert decode_user_comment(b"ASCII\x00\x00\x00Steps: 20") == "Steps: 20"
    assert decode_user_comment(UNICODE_PREFIX + "é".encode("utf-16-le").join([b"\xff\xfe", b""])) == "é"
    assert decode_user_comment(b"\x00" * 8 + b"plain") == "plain"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="png, jpeg, webp"):
        encode_image(picture(), "gif")
    with pytest.raises(ValueError, match="0 to 100"):
        encode_image(picture(), "jpeg", quality=101)
    with pytest.raises(ValueError, match="uint8"):
        encode_image(picture().astype(np.float32), "webp")


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
