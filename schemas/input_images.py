"""Input images of img2img and inpainting, as the API and the worker both see them: the file formats
accepted, and the size a request gets when it leaves width and height out. Plain Python: the API
checks uploads against these (service/input_images.py), the worker decodes by them
(models/image_inputs.py).
"""

from __future__ import annotations

import math

# What PIL calls the formats accepted for init and mask images.
INPUT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def default_size(
    width: int,
    height: int,
    multiple: int,
    max_side: int | None = None,
    max_pixels: int | None = None,
    min_side: int | None = None,
) -> tuple[int, int]:
    """The (width, height) an img2img request defaults to for an init image of width x height: the image's
    own size (as diffusers' `get_default_height_width`), scaled down keeping its aspect ratio when a side
    exceeds `max_side` or the area `max_pixels`, each side then rounded down to a multiple of `multiple`
    and at least `min_side` (rounded up to the multiple) and one multiple."""
    scale = 1.0
    if max_side is not None:
        scale = min(scale, max_side / width, max_side / height)
    if max_pixels is not None:
        scale = min(scale, math.sqrt(max_pixels / (width * height)))
    smallest = max(multiple, math.ceil((min_side or multiple) / multiple) * multiple)
    fitted = []
    for side in (width, height):
        scaled = math.floor(side * scale + 1e-9)  # 1e-9: 1024 * (1000 / 1024) stays 1000
        fitted.append(max(smallest, scaled - scaled % multiple))
    return fitted[0], fitted[1]
