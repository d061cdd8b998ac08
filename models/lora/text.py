"""A request's text-encoder LoRAs, applied while its prompts are encoded.

Prompt encoding is short and per request, so the adapters are merged into the encoders' weights for
the duration of the encoding (W + sum_i weight_i * scale_i * up_i @ down_i, computed in float32) and
the saved weights put back exactly afterwards, whatever happens. Requests with different text LoRAs
are encoded in separate calls (models/pipeline.py groups them); the UNet's adapters are never merged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from models.lora.files import Adapter, LoraFileError

# part -> module name -> adapter (models/lora/files.py: resolve), and the request's weight
TextLora = tuple[Mapping[str, Mapping[str, Adapter]], float]


def linear_names(encoder: nn.Module) -> list[str]:
    """The text encoder's Linear layers: what its LoRAs may adapt."""
    return [name for name, module in encoder.named_modules() if isinstance(module, nn.Linear)]


@contextlib.contextmanager
@torch.no_grad()
def text_adapters_applied(encoders: Mapping[str, nn.Module], loras: Sequence[TextLora]) -> Iterator[None]:
    """Within the block, each encoder (by part name) computes with its LoRAs' deltas added."""
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    for parts, weight in loras:
        for part, adapters in parts.items():
            encoder = encoders.get(part)
            if encoder is None:
                raise LoraFileError(f"the LoRA adapts {part}, which this model does not have")
            for module_name, adapter in adapters.items():
                layer = encoder.get_submodule(module_name)
                delta = adapter.delta_weight()
                if tuple(delta.shape) != tuple(layer.weight.shape):
                    raise LoraFileError(
                        f"{part}.{module_name} is {tuple(layer.weight.shape)}, the LoRA's layer "
                        f"{tuple(delta.shape)} (a LoRA for another base model)"
                    )
                key = (part, module_name)
                delta = delta.to(layer.weight.device) * weight
                deltas[key] = deltas[key] + delta if key in deltas else delta
    saved: dict[tuple[str, str], torch.Tensor] = {}
    try:
        for (part, module_name), delta in deltas.items():
            weight_param = encoders[part].get_submodule(module_name).weight
            saved[(part, module_name)] = weight_param.detach().clone()
            weight_param.copy_((weight_param.float() + delta).to(weight_param.dtype))
        yield
    finally:
        for (part, module_name), original in saved.items():
            encoders[part].get_submodule(module_name).weight.copy_(original)
