"""Uploaded input images (img2img, inpainting), checked before they are stored: the one place the three
routes that take images (POST /v1/img2img, /v1/images/edits, /sdapi/v1/img2img) validate them.

The API does not decode pixels: Pillow reads the header (format, size), the size is held against
SD_MAX_INPUT_PIXELS before anything else (a decompression bomb stops there), and the file's framing is
checked for truncation (PNG: every chunk's CRC up to IEND, without inflating the pixels; JPEG: an end
marker after the last scan; WebP: the RIFF length). The worker decodes the file
(models/image_inputs.py); damage inside the compressed pixels is found there, and that job fails with
an error naming the field. The one exception is OpenAI's mask (`alpha_mask`), whose meaning lives in
its alpha channel: it is decoded here, within the same pixel limit, into the grayscale mask the worker
reads.

Every problem is an InputImageInvalid naming the request's field; each route answers it in its API's
shape (422, or OpenAI's 400).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from dataclasses import dataclass

from PIL import Image

from schemas.input_images import INPUT_IMAGE_FORMATS

# A base64 data URL's prefix ("data:image/png;base64,"), as browsers and AUTOMATIC1111's clients send it.
DATA_URL_PREFIX = re.compile(r"^data:[\w/+.-]*;base64,")


class InputImageInvalid(ValueError):
    """An upload that cannot be an input image; `field` is the request's field, as the client named it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ImageFile:
    """An uploaded image file whose header and framing were checked."""

    data: bytes
    format: str  # PIL's name: PNG, JPEG, WEBP
    width: int
    height: int
    has_alpha: bool  # an alpha channel or transparency information (OpenAI's mask lives there)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def from_base64(text: str, field: str) -> bytes:
    """The bytes of a base64 string (a data URL's prefix allowed); InputImageInvalid otherwise."""
    payload = "".join(DATA_URL_PREFIX.sub("", text.strip(), count=1).split())  # `base64` wraps its lines
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputImageInvalid(field, "not valid base64 (send the image file base64-encoded)") from None


def check_image(data: bytes, field: str, max_pixels: int) -> ImageFile:
    """`data` as an image file: PNG, JPEG or WebP, at most `max_pixels`, not truncated (module
    docstring); InputImageInvalid naming `field` otherwise. Reads the header only."""
    if not data:
        raise InputImageInvalid(field, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is below
            with Image.open(io.BytesIO(data)) as opened:
                image_format, (width, height) = opened.format, opened.size
                has_alpha = opened.has_transparency_data
    except Image.DecompressionBombError:
        raise InputImageInvalid(field, f"the image has more than {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError):
        known = _format_by_magic(data)
        if known is not None:  # the start of such a file, which Pillow could not read through
            raise InputImageInvalid(field, f"the {known} file is truncated or corrupt") from None
        raise InputImageInvalid(field, "not a PNG, JPEG or WebP image") from None
    if image_format not in INPUT_IMAGE_FORMATS:
        raise InputImageInvalid(field, f"a {image_format} image; PNG, JPEG or WebP are accepted")
    if width * height > max_pixels:
        raise InputImageInvalid(
            field,
            f"the image is {width}x{height} = {width * height} pixels; at most {max_pixels} are accepted",
        )
    if not _complete(data, image_format):
        raise InputImageInvalid(field, f"the {image_format} file is truncated or corrupt")
    return ImageFile(data, image_format, width, height, has_alpha)


def _format_by_magic(data: bytes) -> str | None:
    """The accepted format a file's first bytes announce, if any."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _complete(data: bytes, image_format: str) -> bool:
    """Whether the file's framing is whole (module docstring), without decoding its pixels."""
    if image_format == "PNG":
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.verify()  # walks every chunk and its CRC up to IEND; the pixels stay compressed
        except Exception:  # PIL raises OSError, SyntaxError or struct.error here
            return False
        return True
    if image_format == "JPEG":
        # in the entropy-coded data 0xFF is always followed by 0x00 or a restart marker: an end-of-image
        # marker (FF D9) after the last start-of-scan (FF DA) is the file's own end
        return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") > 0
    if image_format == "WEBP":
        (riff_bytes,) = struct.unpack("<I", data[4:8])
        return len(data) >= 8 + riff_bytes
    return True


def check_mask_size(image: ImageFile, mask: ImageFile, field: str) -> None:
    """The mask must be the image's size (InputImageInvalid naming the mask's `field`)."""
    if mask.size != image.size:
        raise InputImageInvalid(
            field,
            f"the mask is {mask.width}x{mask.height}, the image {image.width}x{image.height}: "
            "they must be the same size",
        )


def alpha_mask(image: ImageFile, field: str, required: bool = True) -> ImageFile | None:
    """OpenAI's mask semantics: the fully transparent pixels (alpha 0) of `image` are where to edit. The
    grayscale PNG mask the worker reads (white: repaint, black: keep). Decodes `image`, whose size
    check_image bounded. Without an alpha channel: InputImageInvalid when `required`, else None (as
    when an image that is not required to be a mask has no fully transparent pixel)."""
    if not image.has_alpha:
        if not required:
            return None
        raise InputImageInvalid(
            field,
            "the mask needs an alpha channel: its fully transparent pixels (alpha 0) mark where to edit",
        )
    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            alpha = opened.convert("RGBA").getchannel("A")
    except (OSError, ValueError, SyntaxError):
        raise InputImageInvalid(field, f"the {image.format} file is truncated or corrupt") from None
    if not required and alpha.getextrema()[0] > 0:
        return None
    mask = alpha.point(lambda a: 255 if a == 0 else 0)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return ImageFile(buffer.getvalue(), "PNG", image.width, image.height, has_alpha=False)
