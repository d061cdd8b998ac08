"""Input images for img2img and inpainting tests: a picture with structure at every scale (so a wrong
offset, flip or resize shows) and a rectangular mask, as arrays and as files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def init_picture(width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: diagonal stripes of different periods per channel over a disc."""
    yy, xx = np.mgrid[0:height, 0:width]
    disc = ((xx - width / 3) ** 2 + (yy - height / 2) ** 2) < (min(width, height) / 4) ** 2
    picture = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=-1)
    picture[disc] = (255 - picture[disc]) // 2
    return picture.astype(np.uint8)


def box_mask(width: int, height: int) -> np.ndarray:
    """(height, width) uint8: white (repaint) in a box off the centre, black elsewhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 5 : height * 4 // 5, width // 4 : width * 3 // 4 + 3] = 255
    return mask


def encoded(array: np.ndarray, image_format: str = "PNG") -> bytes:
    """The file of an (H, W, 3) or (H, W) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()
