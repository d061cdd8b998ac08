"""The input images of img2img and inpainting: files (PNG, JPEG, WebP) decoded and fitted to a request's
size, as the arrays the pipeline takes (`ImageInputs`; models/img2img.py turns them into latents).
PIL and numpy only: the worker's job function runs this on its slot thread, off the engine's.

- Decoding: the EXIF orientation is applied (as diffusers' `load_image` and AUTOMATIC1111 do); the
  init image becomes RGB (an alpha channel is dropped, the colours under it kept), the mask grayscale
  (PIL's "L": luminance, alpha ignored). White in the mask is repainted, black kept.
- Fitting to width x height (`resize_mode`), as diffusers' `VaeImageProcessor.resize` with its default
  Lanczos resampling: "resize" stretches (its "default"); "crop" scales to cover and cuts the excess,
  centred; "fill" scales to fit, centred, and fills the borders by stretching the image's edge rows or
  columns. An image already at width x height is used as it is in every mode.
- Mask blur: PIL's GaussianBlur(radius) on the fitted mask, as diffusers' `VaeImageProcessor.blur`
  (which users apply before the pipeline); the pipeline then binarizes the mask at 0.5, as diffusers'
  mask processor does, so the blur rounds the mask's corners and moves its edges where they are
  thinner than the blur.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from schemas.generation import RESIZE_MODES
from schemas.input_images import INPUT_IMAGE_FORMATS as FORMATS
from schemas.input_images import default_size

__all__ = [
    "FORMATS",
    "ImageInputs",
    "InputImageError",
    "decode_image",
    "default_size",
    "fit_image",
    "load_inputs",
]


class InputImageError(ValueError):
    """An input image that cannot be used; `field` names the request's field (init_image, mask_image)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ImageInputs:
    """A request's input images, fitted to its width x height."""

    init: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None = None  # (H, W) uint8 grayscale, white = repaint, blurred; None: img2img

    def __post_init__(self) -> None:
        if self.init.dtype != np.uint8 or self.init.ndim != 3 or self.init.shape[2] != 3:
            raise ValueError(
                f"init must be an (H, W, 3) uint8 array, got {self.init.shape} {self.init.dtype}"
            )
        if self.mask is not None and (self.mask.dtype != np.uint8 or self.mask.shape != self.init.shape[:2]):
            raise ValueError(
                f"mask must be an (H, W) uint8 array of the init image's size {self.init.shape[:2]}, got "
                f"{self.mask.shape} {self.mask.dtype}"
            )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.init.shape[1], self.init.shape[0]


def decode_image(data: bytes, field: str, mode: str = "RGB") -> Image.Image:
    """A PNG, JPEG or WebP file as a PIL image in `mode` ("RGB", "L"), upright (EXIF orientation);
    InputImageError naming `field` for anything else, or a truncated or corrupt file."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format not in FORMATS:
                raise InputImageError(field, f"a {opened.format} image; PNG, JPEG or WebP are accepted")
            opened.load()  # decodes now: a truncated file fails here
            upright = ImageOps.exif_transpose(opened)
            return upright.convert(mode)
    except InputImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputImageError(field, f"not a readable PNG, JPEG or WebP image ({error})") from None


def fit_image(image: Image.Image, width: int, height: int, resize_mode: str = "resize") -> Image.Image:
    """`image` fitted to width x height by `resize_mode` (module docstring), in its own mode."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if image.size == (width, height):
        return image
    if resize_mode == "resize":
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if resize_mode == "crop":  # diffusers' _resize_and_crop
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:  # "fill": diffusers' _resize_and_fill
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    fitted = Image.new(image.mode, (width, height))
    fitted.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if resize_mode == "fill":
        if ratio < src_ratio:  # bands above and below: the first and last rows, stretched
            fill = height // 2 - src_h // 2
            if fill > 0:
                fitted.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                bottom = (0, resized.height, width, resized.height)
                fitted.paste(resized.resize((width, fill), box=bottom), box=(0, fill + src_h))
        elif ratio > src_ratio:  # bands left and right: the first and last columns, stretched
            fill = width // 2 - src_w // 2
            if fill > 0:
                fitted.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                right = (resized.width, 0, resized.width, height)
                fitted.paste(resized.resize((fill, height), box=right), box=(fill + src_w, 0))
    return fitted


def load_inputs(
    init: bytes,
    mask: bytes | None,
    width: int,
    height: int,
    resize_mode: str = "resize",
    mask_blur: int = 0,
) -> ImageInputs:
    """An init image file and an optional mask file as the pipeline's arrays: each decoded, the mask
    checked to be the init image's size, both fitted to width x height by `resize_mode`, the mask then
    blurred with a Gaussian of radius `mask_blur` pixels (0: none). InputImageError names the field."""
    image = decode_image(init, "init_image", "RGB")
    mask_image = None
    if mask is not None:
        mask_image = decode_image(mask, "mask_image", "L")
        if mask_image.size != image.size:
            raise InputImageError(
                "mask_image",
                f"the mask is {mask_image.width}x{mask_image.height}, the init image "
                f"{image.width}x{image.height}: they must be the same size",
            )
        mask_image = fit_image(mask_image, width, height, resize_mode)
        if mask_blur > 0:
            mask_image = mask_image.filter(ImageFilter.GaussianBlur(mask_blur))
    return ImageInputs(
        np.asarray(fit_image(image, width, height, resize_mode)),
        None if mask_image is None else np.asarray(mask_image),
    )
