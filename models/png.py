"""PNG encoding with the generation parameters in AUTOMATIC1111's `parameters` tEXt chunk.

Tools that read A1111's "PNG info" read ours: the prompt line, an optional ``Negative prompt:`` line,
then ``Steps: N, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: G, Seed: S, Size: WxH, Model:
NAME`` (``Schedule type`` only when it is not the model's own; ``Eta`` when a sampler that uses it has
one, so the picture can be reproduced).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

from schemas.generation import Generation
from schemas.samplers import SAMPLERS, a1111_name

PARAMETERS_KEY = "parameters"


def format_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    eta: float = 0.0,
    sampler: str = "ddim",
    scheduler: str = "normal",
) -> str:
    """The A1111 parameters text of one image: its sampler under A1111's name ("DPM++ 2M"), and the
    schedule as A1111 writes it ("Schedule type: Karras") when it is not the model's own."""
    label, schedule = a1111_name(sampler, scheduler)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = [f"Steps: {steps}", f"Sampler: {label}"]
    if scheduler != "normal":
        fields.append(f"Schedule type: {schedule}")
    fields += [
        f"CFG scale: {guidance_scale:g}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
        f"Model: {model}",
    ]
    if eta and SAMPLERS[sampler].uses_eta:
        fields.append(f"Eta: {eta:g}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def parameters_of(generation: Generation, seed: int, model: str) -> str:
    """The A1111 parameters text of the image of `generation` drawn with `seed`."""
    return format_parameters(
        prompt=generation.prompt,
        negative_prompt=generation.negative_prompt,
        steps=generation.steps,
        guidance_scale=generation.guidance_scale,
        seed=seed,
        width=generation.width,
        height=generation.height,
        model=model,
        eta=generation.eta,
        sampler=generation.sampler,
        scheduler=generation.scheduler,
    )


def encode_png(image: np.ndarray, parameters: str | None = None, compress_level: int = 4) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image, with `parameters` in a tEXt chunk when given.

    Non-Latin-1 text (e.g. a prompt in Japanese) goes in an iTXt chunk, which PIL reads the same way.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        try:
            parameters.encode("latin-1")
            info.add_text(PARAMETERS_KEY, parameters)
        except UnicodeEncodeError:
            info.add_itxt(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def read_parameters(png: bytes) -> str | None:
    """The `parameters` text of PNG bytes, or None."""
    with Image.open(io.BytesIO(png)) as image:
        return image.text.get(PARAMETERS_KEY)  # type: ignore[attr-defined]
