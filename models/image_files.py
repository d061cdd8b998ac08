"""Image files (PNG, JPEG, WebP) with the generation parameters inside, where AUTOMATIC1111 puts them.

Tools that read A1111's "PNG info" read ours:
- PNG: a `parameters` tEXt chunk (iTXt when the text is not Latin-1);
- JPEG and WebP: the EXIF UserComment, as A1111 writes it with piexif (`UserComment.dump(text,
  encoding="unicode")`: the 8-byte prefix ``UNICODE\\0`` then UTF-16 big-endian, type UNDEFINED,
  in the Exif IFD of a big-endian TIFF block).

The text: the prompt line, an optional ``Negative prompt:`` line, then ``Steps: N, Sampler: DPM++ 2M,
Schedule type: Karras, CFG scale: G, Seed: S, Size: WxH, Model: NAME`` (``Schedule type`` only when it
is not the model's own; after the model, ``Denoising strength: 0.6`` for img2img and inpainting and
``Mask blur: 4`` for inpainting, as A1111 writes them; ``Eta`` when a sampler that uses it has one, so
the picture can be reproduced). ``Steps`` is the request's, not the int(steps * strength) an img2img
run takes (as A1111).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin

from schemas.generation import DEFAULT_OUTPUT_COMPRESSION, OUTPUT_FORMATS, Generation
from schemas.loras import format_prompt_tags
from schemas.samplers import SAMPLERS, a1111_name

PARAMETERS_KEY = "parameters"

# EXIF UserComment's 8-byte character-code prefixes (EXIF 2.3, table 9), as piexif's helper writes them.
UNICODE_PREFIX = b"UNICODE\x00"  # followed by UTF-16 (big-endian in a big-endian block, as piexif)
ASCII_PREFIX = b"ASCII\x00\x00\x00"
EXIF_HEADER = b"Exif\x00\x00"  # what precedes the TIFF block in a JPEG's APP1 segment

_TIFF_UNDEFINED = 7  # TIFF field type of UserComment
_TIFF_LONG = 4
# At 90 and above, JPEG keeps full-resolution colour (4:4:4): whoever asks for that quality wants
# the picture, not the bytes. Below it, the encoder's default (4:2:0).
JPEG_FULL_CHROMA_FROM_QUALITY = 90


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
    denoising_strength: float | None = None,
    mask_blur: int | None = None,
    lora_hashes: str | None = None,
) -> str:
    """The A1111 parameters text of one image: its sampler under A1111's name ("DPM++ 2M"), and the
    schedule as A1111 writes it ("Schedule type: Karras") when it is not the model's own;
    `denoising_strength` for img2img and inpainting, `mask_blur` for inpainting (None: not written)."""
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
    if lora_hashes:
        fields.append(f'Lora hashes: "{lora_hashes}"')  # "name: hash, name: hash", as A1111 quotes it
    if denoising_strength is not None:
        fields.append(f"Denoising strength: {denoising_strength:g}")
    if mask_blur is not None:
        fields.append(f"Mask blur: {mask_blur}")
    if eta and SAMPLERS[sampler].uses_eta:
        fields.append(f"Eta: {eta:g}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def parameters_of(
    generation: Generation, seed: int, model: str, lora_hashes: Mapping[str, str] | None = None
) -> str:
    """The A1111 parameters text of the image of `generation` drawn with `seed`: its LoRAs as A1111's
    prompt tags after the prompt (so the text reproduces the picture) and, with `lora_hashes` (name ->
    A1111's short hash), A1111's `Lora hashes` field."""
    tags = format_prompt_tags(generation.loras)
    hashes = ", ".join(
        f"{ref.name}: {lora_hashes[ref.name]}" for ref in generation.loras if ref.name in (lora_hashes or {})
    )
    return format_parameters(
        prompt=f"{generation.prompt} {tags}".strip() if tags else generation.prompt,
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
        denoising_strength=generation.strength if generation.init_image is not None else None,
        mask_blur=generation.mask_blur if generation.mask_image is not None else None,
        lora_hashes=hashes or None,
    )


def _check_pixels(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")


def encode_png(image: np.ndarray, parameters: str | None = None, compress_level: int = 4) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image, with `parameters` in a tEXt chunk when given.

    Non-Latin-1 text (e.g. a prompt in Japanese) goes in an iTXt chunk, which PIL reads the same way.
    """
    _check_pixels(image)
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


def exif_user_comment(text: str) -> bytes:
    """An EXIF block (with its ``Exif\\0\\0`` header) holding only `text` as UserComment: what
    ``piexif.dump({"Exif": {UserComment: UserComment.dump(text, encoding="unicode")}})`` writes, plus the
    Exif IFD's next-IFD offset that piexif leaves out (piexif 1.1.3's `load` reads this block back).

    Written by hand because PIL stores bytes as BYTE, not UNDEFINED, and piexif's reader (A1111's)
    then returns a tuple of ints instead of the comment.
    """
    comment = UNICODE_PREFIX + text.encode("utf-16-be")
    ifd_size = 2 + 12 + 4  # entry count, one 12-byte entry, offset of the next IFD (none)
    exif_ifd_at = 8 + ifd_size  # after the 8-byte TIFF header and IFD0
    comment_at = exif_ifd_at + ifd_size
    tiff = b"".join(
        [
            b"MM\x00\x2a" + struct.pack(">I", 8),  # big-endian TIFF, IFD0 at 8
            struct.pack(">HHHII", 1, ExifTags.IFD.Exif, _TIFF_LONG, 1, exif_ifd_at) + struct.pack(">I", 0),
            struct.pack(">HHHII", 1, ExifTags.Base.UserComment, _TIFF_UNDEFINED, len(comment), comment_at)
            + struct.pack(">I", 0),
            comment,
        ]
    )
    return EXIF_HEADER + tiff


def encode_lossy(
    image: np.ndarray,
    image_format: str,
    parameters: str | None = None,
    quality: int = DEFAULT_OUTPUT_COMPRESSION,
) -> bytes:
    """JPEG or WebP bytes of an (H, W, 3) uint8 image at `quality` (0-100), with `parameters` in the
    EXIF UserComment when given."""
    _check_pixels(image)
    if not 0 <= quality <= 100:
        raise ValueError(f"quality should be 0 to 100, got {quality}")
    options: dict[str, object] = {"quality": quality}
    if parameters is not None:
        options["exif"] = exif_user_comment(parameters)
    if image_format == "jpeg":
        pil_format = "JPEG"
        if quality >= JPEG_FULL_CHROMA_FROM_QUALITY:
            options["subsampling"] = 0  # 4:4:4
    elif image_format == "webp":
        pil_format = "WEBP"
        options["method"] = 4  # libwebp's default speed/size trade-off
    else:
        raise ValueError(f"encode_lossy writes jpeg or webp, not {image_format!r}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def encode_image(
    image: np.ndarray,
    image_format: str = "png",
    parameters: str | None = None,
    quality: int = DEFAULT_OUTPUT_COMPRESSION,
) -> bytes:
    """The file of an (H, W, 3) uint8 image in `image_format` (png, jpeg or webp; `quality` for the
    last two), with the A1111 parameters where A1111 writes them."""
    if image_format not in OUTPUT_FORMATS:
        raise ValueError(f"image_format should be one of {', '.join(OUTPUT_FORMATS)}, got {image_format!r}")
    if image_format == "png":
        return encode_png(image, parameters)
    return encode_lossy(image, image_format, parameters, quality)


def decode_user_comment(raw: bytes) -> str:
    """The text of an EXIF UserComment: its 8-byte prefix says how it is encoded (as piexif reads it,
    and A1111's fallback: UTF-8 when the prefix is unknown)."""
    prefix, body = raw[:8], raw[8:]
    if prefix == UNICODE_PREFIX:
        # UTF-16 in the byte order of the block; piexif (and we) write big-endian. A byte-order mark wins.
        if body.startswith((b"\xff\xfe", b"\xfe\xff")):
            return body.decode("utf-16")
        return body.decode("utf-16-be", errors="replace")
    if prefix == ASCII_PREFIX:
        return body.decode("ascii", errors="replace")
    return raw.decode("utf-8", errors="ignore").lstrip("\x00")


def read_parameters(data: bytes) -> str | None:
    """The A1111 parameters text of a PNG, JPEG or WebP file, or None."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return image.text.get(PARAMETERS_KEY)  # type: ignore[attr-defined]
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(comment, bytes):
        return decode_user_comment(comment)
    return comment if isinstance(comment, str) else None
