"""LoRA files (`.safetensors`) in kohya/AUTOMATIC1111's or diffusers/PEFT's names, read into one form.

kohya (sd-scripts, AUTOMATIC1111, LyCORIS' LoCon):
    lora_unet_<module path with "_" for ".">.lora_down.weight  (r, in) or (r, in, kh, kw)
    lora_unet_<...>.lora_up.weight                              (out, r) or (out, r, 1, 1)
    lora_unet_<...>.alpha                                       () ; scale = alpha / r (no alpha: 1)
    lora_te_ (SD 1/2's text encoder), lora_te1_ / lora_te2_ (SDXL's two)
diffusers/PEFT (`save_lora_weights`):
    unet.<module path>.lora_A.weight / .lora_B.weight, text_encoder.<...>, text_encoder_2.<...>;
    scale = lora_alpha / r from the file's `lora_adapter_metadata` (PEFT's LoraConfig per part, with
    its rank_pattern / alpha_pattern), else 1, as diffusers loads it.

kohya's SDXL files (and some SD 1/2 ones) name the UNet's layers as the original (sgm/LDM) UNet does:
lora_unet_input_blocks_4_1_proj_in, middle_block_1_..., output_blocks_2_2_conv; `sgm_to_diffusers`
renames them as diffusers' `_maybe_map_sgm_blocks_to_diffusers` and `_convert_unet_lora_key` do.

Both become `LoraWeights`: per part, a key stem -> `Adapter` (down, up, scale) in float32. A kohya stem
is the module path with "_" for "."; which module it means is decided against the model's own module
names (`resolve`), as kohya and AUTOMATIC1111 do. Other LyCORIS types (LoHa, LoKr, ...) and DoRA are
refused with a message naming the type.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

PARTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_KOHYA_ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_ROLES = {".lora_A.weight": "down", ".lora_B.weight": "up"}
# key patterns of the network types we do not apply, and their names (LyCORIS' and PEFT's)
_REFUSED_TYPES = {
    r"\.hada_w[12]_[ab]$": "LoHa (LyCORIS)",
    r"\.lokr_w[12](_[ab])?$": "LoKr (LyCORIS)",
    r"\.oft_(blocks|diag)$": "OFT (LyCORIS)",
    r"\.boft_": "BOFT",
    r"\.a1\.weight$": "GLoRA (LyCORIS)",
    r"\.diff(_b)?$": "full-weight difference (LyCORIS 'full')",
    r"\.on_input$": "(IA)^3 (LyCORIS)",
    r"\.[wb]_norm$": "norm layers (LyCORIS)",
    r"\.lora_mid\.weight$": "LoCon with a Tucker/CP middle weight (lora_mid)",
    r"\.dora_scale$": "DoRA",
    r"lora_magnitude_vector": "DoRA",
}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


class LoraFileError(ValueError):
    """A file that is not a LoRA we can apply; the message says what it is and why."""


@dataclass(frozen=True)
class Adapter:
    """One adapted layer: delta(x) = scale * up(down(x)), float32."""

    down: torch.Tensor  # (r, in) for a Linear; (r, in, kh, kw) for a Conv2d
    up: torch.Tensor  # (out, r)
    scale: float  # alpha / r

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        """() for a Linear's, (kh, kw) for a convolution's."""
        return tuple(self.down.shape[2:])

    def delta_weight(self) -> torch.Tensor:
        """scale * up @ down, the layer's weight difference: (out, in) or (out, in, kh, kw)."""
        flat = self.up @ self.down.reshape(self.rank, -1)
        return (flat * self.scale).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class LoraWeights:
    format: str  # "kohya" or "peft"
    parts: dict[str, dict[str, Adapter]]  # part -> key stem -> adapter

    @property
    def rank(self) -> int:
        return max((a.rank for adapters in self.parts.values() for a in adapters.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(a.down.nbytes + a.up.nbytes for adapters in self.parts.values() for a in adapters.values())


@dataclass(frozen=True)
class _Layout:
    """What a file's key names say, before any tensor is read."""

    format: str
    # part -> stem -> role ("down", "up", "alpha") -> key in the file
    keys: dict[str, dict[str, dict[str, str]]]


def _refused_type(key: str) -> str | None:
    for pattern, name in _REFUSED_TYPES.items():
        if re.search(pattern, key):
            return name
    return None


def _layout(keys: Iterable[str], where: str) -> _Layout:
    keys = list(keys)
    for key in keys:
        refused = _refused_type(key)
        if refused is not None:
            raise LoraFileError(
                f"{where} is a {refused} network (key {key!r}); only LoRA and LoCon are applied"
            )
    kohya = [k for k in keys if k.startswith(tuple(_KOHYA_PREFIXES))]
    peft = [k for k in keys if k.endswith(tuple(_PEFT_ROLES))]
    layout: dict[str, dict[str, dict[str, str]]] = {}
    if kohya and not peft:
        fmt, roles, found = "kohya", _KOHYA_ROLES, kohya
    elif peft and not kohya:
        fmt, roles, found = "peft", _PEFT_ROLES, peft
    else:
        raise LoraFileError(
            f"{where} holds no LoRA weights in kohya's (lora_unet_..., .lora_down/.lora_up) or "
            "diffusers/PEFT's "
            f"(unet./text_encoder. ... .lora_A/.lora_B) names"
            + (" (it mixes both)" if kohya and peft else f" (keys such as {keys[:2]})")
        )
    for key in found:
        role = next((r for suffix, r in roles.items() if key.endswith(suffix)), None)
        if role is None:
            continue  # e.g. kohya's per-key extras we do not read
        stem = key[: -len(next(s for s in roles if key.endswith(s)))]
        part, stem = _split_part(stem, fmt)
        if part is None:
            raise LoraFileError(f"{where}: key {key!r} names no part we know (unet, text encoders)")
        layout.setdefault(part, {}).setdefault(stem, {})[role] = key
    for part, stems in layout.items():
        for stem, found_roles in stems.items():
            if "down" not in found_roles or "up" not in found_roles:
                missing = "down" if "down" not in found_roles else "up"
                raise LoraFileError(f"{where}: layer {part}.{stem} has no {missing} weight")
    return _Layout(fmt, layout)


def _split_part(stem: str, fmt: str) -> tuple[str | None, str]:
    if fmt == "kohya":
        for prefix, part in sorted(_KOHYA_PREFIXES.items(), key=lambda item: -len(item[0])):
            if stem.startswith(prefix):
                return part, stem[len(prefix) :]
        return None, stem
    stem = stem.removeprefix("base_model.model.")
    for part in sorted(PARTS, key=len, reverse=True):
        if stem.startswith(part + "."):
            return part, stem[len(part) + 1 :]
    if stem.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding")):
        return "unet", stem  # a UNet's own PEFT state dict, without the part prefix
    return None, stem


def _peft_scales(metadata: Mapping[str, str], part: str, stem: str, rank: int) -> float:
    """lora_alpha / r for one layer from diffusers' metadata (PEFT's LoraConfig keys prefixed by the part:
    "unet.lora_alpha", "unet.alpha_pattern", ...), else 1 (diffusers' lora_alpha defaults to r)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return 1.0
    config = json.loads(raw)
    alpha = config.get(f"{part}.lora_alpha", rank)
    for pattern, value in (config.get(f"{part}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", stem):
            alpha = value
    return float(alpha) / rank


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise LoraFileError(f"{path.name} is not a readable .safetensors file: {error}") from None


def read_lora(path: Path) -> LoraWeights:
    """The file's adapters in float32, checked for consistent shapes; LoraFileError if it is not a LoRA
    we can apply."""
    where = path.name
    with _open(path) as handle:
        layout = _layout(handle.keys(), where)
        metadata = handle.metadata() or {}
        parts: dict[str, dict[str, Adapter]] = {}
        try:
            for part, stems in layout.keys.items():
                for stem, roles in stems.items():
                    down = handle.get_tensor(roles["down"]).float()
                    up = handle.get_tensor(roles["up"]).float()
                    parts.setdefault(part, {})[stem] = _adapter(
                        where,
                        part,
                        stem,
                        down,
                        up,
                        handle.get_tensor(roles["alpha"]) if "alpha" in roles else None,
                        metadata if layout.format == "peft" else {},
                    )
        except SafetensorError as error:
            raise LoraFileError(f"{where}: reading its tensors failed: {error}") from None
    return LoraWeights(layout.format, parts)


def _adapter(
    where: str,
    part: str,
    stem: str,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: torch.Tensor | None,
    metadata: Mapping[str, str],
) -> Adapter:
    rank = down.shape[0] if down.dim() else 0
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != rank or rank == 0:
        raise LoraFileError(
            f"{where}: layer {part}.{stem} has down {tuple(down.shape)} and up {tuple(up.shape)}, which "
            "are not "
            "a LoRA pair (down (r, in[, kh, kw]), up (out, r[, 1, 1]))"
        )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraFileError(
            f"{where}: layer {part}.{stem}'s up weight is a {tuple(up.shape[2:])} convolution, not 1x1"
        )
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise LoraFileError(f"{where}: layer {part}.{stem} holds inf or NaN")
    if alpha is not None:
        scale = float(alpha.float().reshape(-1)[0]) / rank
    else:
        scale = _peft_scales(metadata, part, stem, rank)
    return Adapter(down, up.reshape(up.shape[0], rank), scale)


@dataclass(frozen=True)
class LoraHeader:
    """What a file's header says (no weights read): for listings."""

    format: str
    family: str  # "sd" or "sdxl"
    context_dim: int | None  # in-features of its cross-attention k/v downs, when it has any
    rank: int
    layers: dict[str, int]  # part -> adapted layers


def read_header(path: Path) -> LoraHeader:
    """The file's format, base family, rank and layers, from its header alone."""
    with _open(path) as handle:
        layout = _layout(handle.keys(), path.name)
        rank, context_dim = 0, None
        for stems in layout.keys.values():
            for stem, roles in stems.items():
                shape = handle.get_slice(roles["down"]).get_shape()
                rank = max(rank, shape[0])
                if re.search(r"attn2[._]to_[kv]$", stem):
                    context_dim = shape[1]
    sdxl = "text_encoder_2" in layout.keys or context_dim == 2048
    return LoraHeader(
        layout.format,
        "sdxl" if sdxl else "sd",
        context_dim,
        rank,
        {part: len(stems) for part, stems in layout.keys.items()},
    )


def short_hash(path: Path) -> str:
    """AUTOMATIC1111's short hash of a LoRA (`Lora hashes` in PNG parameters): the first 12 hex digits
    of the SHA-256 of the file after its header (kohya's "addnet" hash)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        header_bytes = struct.unpack("<Q", file.read(8))[0]
        file.seek(8 + header_bytes)
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def kohya_stem(module_name: str) -> str:
    """kohya's name of a module: its path with "_" for "." (`down_blocks.0.attentions.0` ->
    `down_blocks_0_attentions_0`)."""
    return module_name.replace(".", "_")


# The original UNet's resnet layers under diffusers' names; other inner layers keep their names.
_SGM_RESNET_LAYERS = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
# Layers outside the block structure (none of them is adapted here; named so the error says so).
_SGM_OUTER_LAYERS = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}
_SGM_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)|middle_block_(\d+)_(.+)")


def _sgm_inner(rest: str, index: int) -> str:
    """An inner layer of an original-UNet block entry as diffusers names it (kohya stem form)."""
    if rest == "op":
        return "downsamplers_0_conv"
    if rest == "conv":
        return "upsamplers_0_conv"
    for sgm, diffusers in _SGM_RESNET_LAYERS.items():
        if rest == sgm:
            return f"resnets_{index}_{diffusers}"
    return f"attentions_{index}_{rest}"  # proj_in, transformer_blocks_0_attn1_to_q, ...


def sgm_to_diffusers(stem: str, layers_per_block: int) -> str:
    """A kohya UNet stem in the original UNet's names (input_blocks_4_1_proj_in) in diffusers' names
    (down_blocks_1_attentions_1_proj_in) for a UNet of `layers_per_block`; other stems unchanged.

    Which inner layer an entry holds is read from the layer's own name (a resnet's in_layers_2, a
    downsampler's op, an upsampler's conv), not from the entry's position, which depends on whether
    the level has attention."""
    if stem in _SGM_OUTER_LAYERS:
        return _SGM_OUTER_LAYERS[stem]
    match = _SGM_BLOCK.fullmatch(stem)
    if match is None:
        return stem
    per_level = layers_per_block + 1
    if match.group(5) is not None:  # the middle block: resnet, attention, resnet
        index, rest = int(match.group(5)), match.group(6)
        return "mid_block_" + _sgm_inner(rest, {0: 0, 1: 0, 2: 1}.get(index, index))
    kind, entry, rest = match.group(1), int(match.group(2)), match.group(4)
    if kind == "input_blocks":  # entry 0 is conv_in; then each level's resnets and its downsampler
        level, index = divmod(entry - 1, per_level)
        return f"down_blocks_{level}_" + _sgm_inner(rest, index)
    level, index = divmod(entry, per_level)  # each up level: layers_per_block + 1 resnets
    return f"up_blocks_{level}_" + _sgm_inner(rest, index)


def _layers_per_block(names: Iterable[str]) -> int:
    """The UNet's layers_per_block, from its module names (the resnets of its first down block)."""
    found = [int(m.group(1)) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)(\.|$)", n))]
    return max(found) + 1 if found else 1


def _text_variants(name: str) -> tuple[str, ...]:
    # transformers 5's CLIPTextModel has no `text_model.` level; files written with older ones do
    bare = name.removeprefix("text_model.")
    return (bare, "text_model." + bare)


def _stems(names: Iterable[str], part: str, fmt: str) -> dict[str, str]:
    """How a file of format `fmt` may spell each of a part's module names: stem -> module name."""
    stems: dict[str, str] = {}
    for name in names:
        for variant in _text_variants(name) if part.startswith("text_encoder") else (name,):
            stems[variant if fmt == "peft" else kohya_stem(variant)] = name
    return stems


def resolve(
    weights: LoraWeights,
    module_names: Mapping[str, Iterable[str]],
    where: str,
    present: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, dict[str, Adapter]]:
    """The adapters keyed by the model's module names (`module_names`: the layers LoRAs apply to),
    per part; LoraFileError naming the layers the model does not have (a LoRA for another base
    model), a part it lacks, or layers it has (`present`: all its module names) that LoRAs are not
    applied to here."""
    resolved: dict[str, dict[str, Adapter]] = {}
    for part, adapters in weights.parts.items():
        if part not in module_names:
            raise LoraFileError(
                f"{where} adapts {part}, which this model does not have (a LoRA for another base model)"
            )
        names = list(module_names[part])
        all_names = list((present or {}).get(part, ())) or names
        lookup = _stems(names, part, weights.format)
        if part == "unet" and weights.format == "kohya":
            per_block = _layers_per_block(all_names)
            adapters = {sgm_to_diffusers(stem, per_block): adapter for stem, adapter in adapters.items()}
        unknown = [stem for stem in adapters if stem not in lookup]
        existing = _stems(all_names, part, weights.format) if unknown else {}
        unsupported = [stem for stem in unknown if stem in existing]
        if unsupported:
            raise LoraFileError(
                f"{where} adapts {len(unsupported)} layers of the {part} that this server does not apply "
                f"LoRAs to (e.g. {unsupported[0]!r}; it applies them to the UNet's attention, "
                "feed-forward, resnet and resampling layers and the text encoders' linear layers)"
            )
        if unknown:
            raise LoraFileError(
                f"{where} adapts {len(unknown)} layers of the {part} this model does not have (e.g. "
                f"{unknown[0]!r}): a LoRA for another base model"
            )
        resolved[part] = {lookup[stem]: adapter for stem, adapter in adapters.items()}
    return resolved
