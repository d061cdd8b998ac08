"""Random LoRAs for the tests, on a model's own layers, written in both file formats.

`random_lora` draws low-rank weights for a model: the UNet's transformer layers (attention q/k/v/out,
feed-forward, proj_in/out), optionally LoCon convolutions (resnet convs, time projection, down/
upsamplers), and the text encoder's attention and MLP. `write_peft` writes them as diffusers'
`save_lora_weights` does (PEFT names, `lora_adapter_metadata` with lora_alpha); `write_kohya` the same
weights under kohya's names (`lora_unet_*`, `lora_te_text_model_*`, `.alpha`), the UNet's optionally in
the original (sgm/LDM) UNet's names as kohya's SDXL files have them (`original_unet_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from models.stable_diffusion import StableDiffusion


@dataclass(frozen=True)
class RandomLora:
    rank: int
    alpha: float
    # part ("unet", "text_encoder") -> module name -> (down (r, in[, kh, kw]), up (out, r[, 1, 1]))
    layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]


_TRANSFORMER_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
_RESNET_LEAVES = (
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
)
_TEXT_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(module: nn.Module, leaves: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear | nn.Conv2d) and name.endswith(leaves)
    ]


def random_lora(
    model: StableDiffusion,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    locon: bool = False,
    std: float = 0.2,
) -> RandomLora:
    """Random adapters for `model`'s layers (module names as diffusers names them)."""
    generator = torch.Generator().manual_seed(seed)
    leaves = _TRANSFORMER_LEAVES + (_RESNET_LEAVES if locon else ())
    parts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {"unet": {}, "text_encoder": {}}
    modules = [("unet", model.unet, leaves), ("text_encoder", model.text_encoder, _TEXT_LEAVES)]
    if model.text_encoder_2 is not None:  # SDXL
        parts["text_encoder_2"] = {}
        modules.append(("text_encoder_2", model.text_encoder_2, _TEXT_LEAVES))
    for part, module, part_leaves in modules:
        for name, layer in _targets(module, part_leaves):
            if isinstance(layer, nn.Conv2d):
                down = torch.randn((rank, layer.in_channels, *layer.kernel_size), generator=generator)
                up = torch.randn((layer.out_channels, rank, 1, 1), generator=generator)
                fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
            else:
                down = torch.randn((rank, layer.in_features), generator=generator)
                up = torch.randn((layer.out_features, rank), generator=generator)
                fan_in = layer.in_features
            parts[part][name.removeprefix("text_model.")] = (down * std / fan_in**0.5, up * std / rank**0.5)
    return RandomLora(rank, alpha, parts)


def write_peft(lora: RandomLora, path: Path) -> Path:
    """As diffusers' StableDiffusionPipeline.save_lora_weights (SDXL's) writes it (PEFT names, metadata)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig

    layers, metadata = {}, {}
    for part, modules in lora.layers.items():
        if not modules:
            continue
        layers[part] = {}
        for name, (down, up) in modules.items():
            layers[part][f"{name}.lora_A.weight"] = down.contiguous()
            layers[part][f"{name}.lora_B.weight"] = up.contiguous()
        metadata[part] = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, target_modules=sorted(modules)
        ).to_dict()
    sdxl = "text_encoder_2" in lora.layers
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {}
    if sdxl:
        extra = {
            "text_encoder_2_lora_layers": layers.get("text_encoder_2"),
            "text_encoder_2_lora_adapter_metadata": metadata.get("text_encoder_2"),
        }
    pipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=layers.get("unet"),
        text_encoder_lora_layers=layers.get("text_encoder"),
        unet_lora_adapter_metadata=metadata.get("unet"),
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
        weight_name=path.name,
        **extra,
    )
    return path


_ORIGINAL_RESNET_LAYERS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def original_unet_name(name: str, unet: nn.Module) -> str:
    """A diffusers UNet module name as the original (sgm/LDM) UNet names it: input_blocks.N (entry 0
    is conv_in, then per level its resnets and downsampler), middle_block.0-2, output_blocks.N (per
    level layers_per_block + 1 entries of resnet, attention, upsampler)."""
    names = [n for n, _ in unet.named_modules()]
    per_level = 2 + max(
        int(m.group(1)) for n in names if (m := re.fullmatch(r"down_blocks\.0\.resnets\.(\d+)", n))
    )
    last = per_level - 1  # layers_per_block: the downsampler's / upsampler's entry in its level
    mid = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if mid:
        entry = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[mid.group(1), mid.group(2)]
        inner = _ORIGINAL_RESNET_LAYERS.get(mid.group(3), mid.group(3))
        return f"middle_block.{entry}.{inner}"
    block = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(\w+)\.(\d+)\.(.+)", name)
    assert block, name
    side, level, kind, index, rest = (
        block.group(1),
        int(block.group(2)),
        block.group(3),
        int(block.group(4)),
        block.group(5),
    )
    if side == "down_blocks":
        first = 1 + level * per_level
        if kind == "downsamplers":
            return f"input_blocks.{first + last}.0.op"
        slot = {"resnets": 0, "attentions": 1}[kind]
        inner = _ORIGINAL_RESNET_LAYERS[rest] if kind == "resnets" else rest
        return f"input_blocks.{first + index}.{slot}.{inner}"
    first = level * per_level
    if kind == "upsamplers":
        has_attention = any(n.startswith(f"up_blocks.{level}.attentions.") for n in names)
        return f"output_blocks.{first + last}.{2 if has_attention else 1}.conv"
    slot = {"resnets": 0, "attentions": 1}[kind]
    inner = _ORIGINAL_RESNET_LAYERS[rest] if kind == "resnets" else rest
    return f"output_blocks.{first + index}.{slot}.{inner}"


def write_kohya(lora: RandomLora, path: Path, original_names_of: nn.Module | None = None) -> Path:
    """The same weights under kohya's names (text encoders with transformers 4's `text_model.` level;
    SDXL's two as lora_te1_ and lora_te2_); with `original_names_of` (the model's UNet), the UNet's
    layers in the original UNet's names."""
    tensors = {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
    if "text_encoder_2" in lora.layers:
        prefixes |= {"text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"}
    for part, modules in lora.layers.items():
        for name, (down, up) in modules.items():
            if part == "unet" and original_names_of is not None:
                name = original_unet_name(name, original_names_of)
            stem = prefixes[part] + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down.contiguous()
            tensors[f"{stem}.lora_up.weight"] = up.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(float(lora.alpha))
    save_file(tensors, str(path))
    return path
