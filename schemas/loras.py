"""LoRAs in a request: the reference a request carries (`LoraRef`), AUTOMATIC1111's prompt tags, and
what a worker publishes about the LoRA files it can load (`LoraInfo`).

A LoRA is named by its file name without `.safetensors`, in the worker's SD_LORA_DIR; a name is never
a path (LORA_NAME_PATTERN: no `/`, `\\`, `:`, and it starts with a letter or digit, so `../x` is
refused before anything looks at a disk).

AUTOMATIC1111 writes LoRAs into the prompt: `<lora:name:weight>` (weight optional, 1 when left out).
`split_prompt_tags` takes them out of the text as AUTOMATIC1111 does (the tag is replaced by nothing,
the text around it kept as it is) and returns them as LoraRefs; Generation applies it when it is built,
so every route (ours, OpenAI's, AUTOMATIC1111's) gets it.

Depends on pydantic only (the API image has no torch).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

LORA_NAME_MAX_CHARS = 128
LORA_NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9 ._+-]{{0,{LORA_NAME_MAX_CHARS - 1}}}$"
LORA_NAME_RULE = (
    f"a file name in SD_LORA_DIR without .safetensors: letters, digits, space, '.', '_', '+' and '-', "
    f"starting with a letter or digit, at most {LORA_NAME_MAX_CHARS} characters (no path)"
)
LORA_WEIGHT_MAX = 4.0  # |weight|: far beyond any useful strength, yet finite
LORAS_LIMIT = 8  # hard limit per request; SD_MAX_LORAS_PER_REQUEST tightens it (default 4)
DEFAULT_MAX_LORAS_PER_REQUEST = 4
LORA_FILE_SUFFIX = ".safetensors"

_NAME = re.compile(LORA_NAME_PATTERN)
# AUTOMATIC1111's extra-network tag (modules/extra_networks.py: re_extra_net), for LoRAs only: other
# networks' tags (<hypernet:...>) stay in the text, as they would for a webui without that network
_TAG = re.compile(r"<lora:([^>]+)>")


def is_lora_name(text: str) -> bool:
    return bool(_NAME.match(text))


class LoraRef(BaseModel):
    """One LoRA applied to a request: its name and its strength (AUTOMATIC1111's multiplier, diffusers'
    `set_adapters` weight): the UNet and the text encoders each add weight x up(down(x))."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(strict=True, pattern=LORA_NAME_PATTERN)] = Field(
        description=f"The LoRA's name, one that GET /v1/loras lists: {LORA_NAME_RULE}."
    )
    weight: Annotated[
        float, Field(strict=True, allow_inf_nan=False, ge=-LORA_WEIGHT_MAX, le=LORA_WEIGHT_MAX)
    ] = Field(1.0, description=f"Strength, -{LORA_WEIGHT_MAX:g} to {LORA_WEIGHT_MAX:g} (1: as trained).")


class PromptTagError(ValueError):
    """A `<lora:...>` tag that cannot be read; the message quotes it."""


def split_prompt_tags(prompt: str) -> tuple[str, list[dict[str, object]]]:
    """(the prompt without its `<lora:name[:weight]>` tags, the tags as LoraRef fields in order).

    As AUTOMATIC1111: each tag is replaced by nothing; the weight is its second field (1 when absent);
    A1111's further fields (a separate UNet weight, `unet=`/`te=` names) are refused rather than
    silently read differently. The fields are validated as LoraRef's (name pattern, weight bounds)
    by the caller."""
    found: list[dict[str, object]] = []

    def take(match: re.Match[str]) -> str:
        parts = match.group(1).split(":")
        if len(parts) > 2:
            raise PromptTagError(
                f"prompt tag {match.group(0)!r}: only <lora:name> and <lora:name:weight> are understood"
            )
        ref: dict[str, object] = {"name": parts[0].strip()}
        if len(parts) == 2:
            try:
                ref["weight"] = float(parts[1])
            except ValueError:
                raise PromptTagError(
                    f"prompt tag {match.group(0)!r}: the weight {parts[1]!r} is not a number"
                ) from None
        found.append(ref)
        return ""

    text = _TAG.sub(take, prompt)
    return text, found


def format_prompt_tags(loras: list[LoraRef]) -> str:
    """The LoRAs as AUTOMATIC1111's prompt tags (what a PNG's parameters show after the prompt)."""
    return "".join(f"<lora:{ref.name}:{ref.weight:g}>" for ref in loras)


class LoraInfo(BaseModel):
    """A LoRA file as a worker found it in SD_LORA_DIR (read from its header, no weights loaded)."""

    name: str = Field(description="What requests name it by: the file name without .safetensors.")
    family: str = Field(
        description='The base model family it was trained for: "sd" (SD 1.x/2.x) or "sdxl" '
        "(as GET /v1/models)."
    )
    context_dim: int | None = Field(
        None,
        description="Width of the text context its cross-attention layers read (768 SD 1.x, 1024 SD 2.x, "
        "2048 SDXL).",
    )
    format: str = Field(description='"kohya" (kohya/AUTOMATIC1111 names) or "peft" (diffusers/PEFT names).')
    rank: int = Field(description="The largest rank of its layers.")
    size_bytes: int = Field(description="Size of the file.")
    layers: dict[str, int] = Field(
        description='Layers it adapts, counted by part: "unet", "text_encoder", "text_encoder_2".'
    )
    usable: bool = Field(True, description="Whether the serving worker can apply it to its model.")
    problem: str | None = Field(None, description="Why it cannot be applied (usable false).")
