"""Model families: what differs between SD 1.x/2.x and SDXL, behind one small interface.

A family says how prompts become the per-row conditioning its UNet needs (the cross-attention
context, and for SDXL also the pooled text embedding), which per-row inputs a request adds (SDXL's
six size/crop numbers), and which request fields it accepts. The pipeline asks the model's family
(`family_of`) and stacks what it returns without knowing what is inside (models/pipeline.py).

The UNet's blocks are shared by every family: its config says which it has (per-level transformer
depth, SDXL's added "text_time" embedding; models/configs.py, models/unet.py), so a family only
names what its checkpoints hold (models/loading.py builds them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from models.stable_diffusion import StableDiffusion
from schemas.generation import Generation


@dataclass(frozen=True)
class Conditioning:
    """One prompt's conditioning: its cross-attention context and the UNet's per-row inputs it
    carries (models/unet.py: ROW_INPUTS; SDXL: `text_embeds`)."""

    context: torch.Tensor  # (L, D), L = chunks * 77
    row_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # (1, ...) each


class PromptEncoding(Protocol):
    def encode_pairs(
        self, prompts: Sequence[str], negative_prompts: Sequence[str | None]
    ) -> list[tuple[Conditioning, Conditioning | None]]:
        """(prompt, negative prompt) pairs -> (cond, uncond) each, in one batch; a None negative
        prompt: no unconditional pass (uncond None). cond and uncond have the same context length."""
        ...


class Family(Protocol):
    name: str  # published by the worker (WorkerInfo.family) and /v1/models
    label: str  # for people: "SD 1.x/2.x", "SDXL"

    def prompt_encoder(self, model: StableDiffusion, max_text_batch: int) -> PromptEncoding:
        """The model's prompt encoder; `max_text_batch`: prompt chunks per text-encoder call."""
        ...

    def request_row_inputs(self, model: StableDiffusion, request: Generation) -> dict[str, torch.Tensor]:
        """Per-row UNet inputs a request's rows carry beyond its prompts', (1, ...) each on the
        model's device, the same for its prompt and negative-prompt rows."""
        ...

    def check_generation(self, model: StableDiffusion, request: Generation) -> None:
        """Raise ValueError naming a request field this family cannot honour."""
        ...


def family_of(model: StableDiffusion) -> Family:
    """The family of a loaded model: SDXL when its UNet has the "text_time" added conditioning."""
    from models.families.sd import SD
    from models.families.sdxl import SDXL

    return SDXL if model.unet.config.addition_embed_type == "text_time" else SD
