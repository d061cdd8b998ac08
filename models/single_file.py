"""Original single-file Stable Diffusion checkpoints (CompVis / Stability "ldm" layout): SD 1.x, 2.x, SDXL.

A single file holds the whole model under three prefixes: `model.diffusion_model.` (UNet),
`first_stage_model.` (VAE) and `cond_stage_model.` (text encoder: HF CLIP for SD 1.x, OpenCLIP for
SD 2.x); SDXL's two text encoders are `conditioner.embedders.0.transformer.` (HF CLIP ViT-L) and
`conditioner.embedders.1.model.` (OpenCLIP bigG, fused q/k/v `in_proj`, with its `text_projection`).
This module reads and writes such files and converts their state dicts to and from the diffusers key
layout, which is also the layout of our own modules:

    state_dict = read_checkpoint("v1-5-pruned-emaonly.safetensors")
    variant = detect_variant(state_dict)              # "sd1", "sd2" or "sdxl"
    weights = ldm_to_diffusers(state_dict, configs)   # {"unet": ..., "vae": ..., "text_encoder": ...}

Conversion is strict: every key a config requires must be in the file with a shape that fits, and
every key of the file must map somewhere or be one of the known unused keys (noise-schedule
buffers, EMA copies, OpenCLIP's projection and the text layers a config leaves out). A checkpoint of
another family (SDXL refiner or inpainting, SD3, Flux) is refused naming what was found.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from models.single_file_keys import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    TEXT_PREFIX,
    TensorMap,
    clip_tensor_maps,
    open_clip_tensor_maps,
    unet_tensor_maps,
    vae_tensor_maps,
)

logger = logging.getLogger(__name__)

VARIANTS = ("sd1", "sd2", "sdxl")
COMPONENTS = ("unet", "vae", "text_encoder")
SDXL_COMPONENTS = (*COMPONENTS, "text_encoder_2")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # read only through torch.load(weights_only=True)

# Training-time buffers of ldm's LatentDiffusion: the noise schedule, recomputed from the config.
_SCHEDULE_KEYS = {
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "betas",
    "log_one_minus_alphas_cumprod",
    "logvar",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "denoiser.sigmas",  # Stability's sgm (SDXL) keeps its sigmas as buffers
    "denoiser.log_sigmas",
}
_EMA_PREFIX = "model_ema."  # EMA copy of the UNet; like diffusers' default, we load the non-EMA weights
# Per variant: text-tower keys that exist in real files and have no counterpart in CLIPTextModel.
_UNUSED_TEXT_KEYS = {
    "sd1": {CLIP_PREFIX + TEXT_PREFIX + "embeddings.position_ids"},  # a buffer older transformers saved
    "sd2": {OPEN_CLIP_PREFIX + name for name in ("text_projection", "logit_scale", "attn_mask")},
    "sdxl": {
        SDXL_CLIP_PREFIX + TEXT_PREFIX + "embeddings.position_ids",
        SDXL_OPEN_CLIP_PREFIX + "logit_scale",
        SDXL_OPEN_CLIP_PREFIX + "attn_mask",
    },
}
# Text layers at or beyond the config's num_hidden_layers (SD 2.x files hold 24, its config uses 23;
# SDXL's configs use every layer of both towers).
_TEXT_LAYER_PATTERN = {
    "sd1": re.compile(re.escape(CLIP_PREFIX + TEXT_PREFIX) + r"encoder\.layers\.(\d+)\."),
    "sd2": re.compile(re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\."),
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the configs."""


# --------------------------------------------------------------------------------------- files


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, or of a `.ckpt`/`.pt`/`.pth`/`.bin` file.

    Pickle-based files are read only with `torch.load(weights_only=True)`, which refuses arbitrary
    Python objects. A top-level `"state_dict"` entry (PyTorch Lightning checkpoints) is unwrapped.
    Raises CheckpointError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {path} does not exist" + (" (it is a folder)" if path.is_dir() else "")
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state_dict = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        state_dict = _read_torch_file(path)
    else:
        allowed = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
        raise CheckpointError(
            f"{path}: unsupported checkpoint file type {suffix!r} (expected one of {allowed})"
        )
    return _only_tensors(state_dict, path)


def write_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write tensors as `.safetensors`, or as `.ckpt`/`.pt`/`.pth` (`torch.save({"state_dict": ...})`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    elif suffix in TORCH_SUFFIXES:
        torch.save({"state_dict": dict(state_dict)}, path)
    else:
        allowed = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
        raise CheckpointError(
            f"{path}: cannot write checkpoint file type {suffix!r} (expected one of {allowed})"
        )


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a valid .safetensors file (truncated, corrupt or another format): {err}"
        ) from err


def _read_torch_file(path: Path) -> Any:
    # Check the container first: torch's own errors for junk and truncated files are cryptic.
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is a truncated or corrupt PyTorch checkpoint (incomplete zip archive)"
            )
    elif not head.startswith(b"\x80"):  # the legacy format is a bare pickle (protocol >= 2)
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _weights_only_reason(str(err))
        if reason is None:
            raise CheckpointError(f"{path} is a corrupt PyTorch checkpoint: {err}") from err
        raise CheckpointError(
            f"{path} holds Python objects that torch.load(weights_only=True) refuses to load ({reason}); "
            "only tensor checkpoints are accepted: convert it to .safetensors with a tool you trust"
        ) from err
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"{path} is a truncated or corrupt PyTorch checkpoint: {type(err).__name__}: {err}"
        ) from err
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return data


def _weights_only_reason(message: str) -> str | None:
    """torch's one-line reason ('Unsupported global: GLOBAL x.Y ...') when weights_only refused an object."""
    match = re.search(r"WeightsUnpickler error: ([^\n]*)", message)
    if match is None or "Unsupported" not in match.group(1):
        return None
    return match.group(1).split(" was not an allowed global")[0]


def _only_tensors(data: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (top-level keys: {_preview([str(k) for k in data])})")
    others = sorted(str(k) for k in data if k not in tensors)
    if others:
        logger.warning(
            "%s: ignoring %d entries that are not tensors: %s", path.name, len(others), _preview(others)
        )
    return tensors


# ------------------------------------------------------------------------------------ variants


def detect_variant(state_dict: Mapping[str, Any]) -> str:
    """The variant of an ldm state dict, from its keys: "sd1" (HF CLIP text tower), "sd2" (OpenCLIP)
    or "sdxl" (both, as `conditioner.embedders.0/1`). Other families are refused, naming what was found."""
    _refuse_other_families(state_dict)
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        return _detect_sdxl(state_dict)
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        raise CheckpointError(
            f"not a Stable Diffusion single-file checkpoint: no '{UNET_PREFIX}' keys "
            f"(found {len(state_dict)} keys: {_preview(sorted(state_dict))})"
        )
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict):
        return "sd2"
    if any(k.startswith(CLIP_PREFIX) for k in state_dict):
        return "sd1"
    raise CheckpointError(
        "checkpoint not supported: it has a UNet but no SD 1.x (cond_stage_model.transformer.*) or SD 2.x "
        "(cond_stage_model.model.*) text encoder"
    )


def _refuse_other_families(state_dict: Mapping[str, Any]) -> None:
    """SD3 and Flux are transformers, not UNets: say so rather than 'no UNet keys'."""
    for marker, family in (("joint_blocks.", "SD3 (MMDiT)"), ("double_blocks.", "Flux")):
        found = next((k for k in state_dict if k.startswith((marker, UNET_PREFIX + marker))), None)
        if found is not None:
            raise CheckpointError(
                f"this is a {family} checkpoint (found {found!r}): not supported; supported are SD 1.x, "
                "SD 2.x and SDXL base"
            )


def _detect_sdxl(state_dict: Mapping[str, Any]) -> str:
    """An SDXL base checkpoint, or a clear refusal of the SDXL variants we do not run."""
    embedders = sorted(
        {".".join(k.split(".")[:4]) for k in state_dict if k.startswith("conditioner.embedders.")}
    )
    if any(k.startswith("conditioner.embedders.0.model.") for k in state_dict):
        raise CheckpointError(
            "this is an SDXL refiner checkpoint (conditioner.embedders.0 is OpenCLIP bigG alone, and its UNet "
            "takes an aesthetic score: 5 size/score numbers): not supported, only SDXL base models are"
        )
    has_clip = any(k.startswith(SDXL_CLIP_PREFIX) for k in state_dict)
    has_open_clip = any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in state_dict)
    if not (has_clip and has_open_clip):
        raise CheckpointError(
            f"SDXL-style checkpoint with unknown text encoders ({', '.join(embedders)}): not supported; SDXL base holds "
            f"{SDXL_CLIP_PREFIX}* (CLIP ViT-L) and {SDXL_OPEN_CLIP_PREFIX}* (OpenCLIP bigG)"
        )
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        raise CheckpointError(f"SDXL checkpoint without a UNet: no '{UNET_PREFIX}' keys")
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.dim() == 4 and conv_in.shape[1] != 4:
        kind = "an SDXL inpainting" if conv_in.shape[1] == 9 else "an SDXL"
        raise CheckpointError(
            f"this is {kind} checkpoint whose UNet takes {conv_in.shape[1]} input channels "
            f"({UNET_PREFIX}input_blocks.0.0.weight {tuple(conv_in.shape)}): not supported, only "
            "text-to-image SDXL (4 latent channels) is"
        )
    return "sdxl"


def components_of(variant: str) -> tuple[str, ...]:
    """The diffusers components a variant's single file holds."""
    return SDXL_COMPONENTS if variant == "sdxl" else COMPONENTS


def tensor_maps(configs: Mapping[str, Mapping[str, Any]], variant: str) -> dict[str, list[TensorMap]]:
    """The key tables of each component for diffusers-format `configs` ("unet", "vae", "text_encoder";
    SDXL: also "text_encoder_2")."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    components = components_of(variant)
    missing = [name for name in components if name not in configs]
    if missing:
        raise ValueError(f"configs lack {missing} (need {list(components)})")
    maps = {
        "unet": unet_tensor_maps(configs["unet"], UNET_PREFIX),
        "vae": vae_tensor_maps(configs["vae"], VAE_PREFIX),
    }
    if variant == "sdxl":
        maps["text_encoder"] = clip_tensor_maps(configs["text_encoder"], SDXL_CLIP_PREFIX)
        maps["text_encoder_2"] = open_clip_tensor_maps(
            configs["text_encoder_2"], SDXL_OPEN_CLIP_PREFIX, projection=True
        )
    else:
        text_maps = clip_tensor_maps if variant == "sd1" else open_clip_tensor_maps
        maps["text_encoder"] = text_maps(configs["text_encoder"])
    return maps


# ---------------------------------------------------------------------------------- conversion


def ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], configs: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Split an ldm state dict into diffusers-named state dicts {"unet", "vae", "text_encoder"} (and
    "text_encoder_2" for SDXL).

    Text encoder keys carry the `text_model.` prefix, as real HF checkpoints do. Raises
    CheckpointError naming the missing keys, the keys that map nowhere, or the tensors whose shape
    does not fit the configs.
    """
    variant = detect_variant(state_dict)
    maps = tensor_maps(configs, variant)
    result: dict[str, dict[str, torch.Tensor]] = {}
    used: set[str] = set()
    missing: list[str] = []
    bad_shapes: list[str] = []
    for component, component_maps in maps.items():
        result[component] = {}
        for m in component_maps:
            tensor = state_dict.get(m.ldm_key)
            if tensor is None:
                missing.append(m.ldm_key)
                continue
            used.add(m.ldm_key)
            if not m.accepts_ldm_shape(tensor.shape):
                bad_shapes.append(f"{m.ldm_key}: expected {m.ldm_shape}, found {tuple(tensor.shape)}")
                continue
            result[component].update(m.to_diffusers(tensor))
    unused = [k for k in state_dict if k not in used]
    num_layers = int(configs["text_encoder"]["num_hidden_layers"])
    unexpected = [k for k in unused if not _known_unused(k, variant, num_layers)]
    _raise_on_mismatch(f"the {variant} checkpoint", missing, unexpected, bad_shapes)
    if unused:
        logger.info("ignored %d known unused checkpoint keys: %s", len(unused), _preview(sorted(unused)))
    return result


def diffusers_to_ldm(
    components: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, Mapping[str, Any]],
    variant: str,
) -> dict[str, torch.Tensor]:
    """One ldm state dict from diffusers-named state dicts {"unet", "vae", "text_encoder"} (SDXL: and
    "text_encoder_2"): the inverse.

    `variant` picks the text-tower layout: "sd1" (HF CLIP keys), "sd2" (OpenCLIP keys) or "sdxl"
    (both, with bigG's projection). Text
    encoder keys may come with or without `text_model.` (transformers 5 drops it). An SD 2.x file
    written here holds the config's `num_hidden_layers` resblocks and no `text_projection` (the
    weights do not have them): diffusers' `convert_open_clip_checkpoint` needs neither.
    """
    maps = tensor_maps(configs, variant)
    result: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    bad_shapes: list[str] = []
    for component, component_maps in maps.items():
        given = dict(components[component]) if component in components else {}
        if component in ("text_encoder", "text_encoder_2"):
            given = {
                k if k.startswith(TEXT_PREFIX) or k == "text_projection.weight" else TEXT_PREFIX + k: v
                for k, v in given.items()
            }
            given.pop(TEXT_PREFIX + "embeddings.position_ids", None)
        for m in component_maps:
            tensors = [given.pop(key, None) for key in m.diffusers_keys]
            absent = [key for key, t in zip(m.diffusers_keys, tensors, strict=True) if t is None]
            if absent:
                missing += [f"{component}: {key}" for key in absent]
                continue
            wrong = [t for t in tensors if tuple(t.shape) != m.shape]
            if wrong:
                found = tuple(wrong[0].shape)
                bad_shapes.append(f"{component}: {m.diffusers_keys[0]}: expected {m.shape}, found {found}")
                continue
            result[m.ldm_key] = m.to_ldm(tensors)
        unexpected += [f"{component}: {key}" for key in given]
    _raise_on_mismatch(f"the {variant} diffusers weights", missing, unexpected, bad_shapes)
    return result


def _known_unused(key: str, variant: str, num_text_layers: int) -> bool:
    if key in _SCHEDULE_KEYS or key.startswith(_EMA_PREFIX) or key in _UNUSED_TEXT_KEYS[variant]:
        return True
    pattern = _TEXT_LAYER_PATTERN.get(variant)
    match = pattern.match(key) if pattern is not None else None
    return match is not None and int(match.group(1)) >= num_text_layers


def _raise_on_mismatch(what: str, missing: list[str], unexpected: list[str], bad_shapes: list[str]) -> None:
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys the configs require are missing: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} keys map to nothing in the configs: {_preview(unexpected)}")
    if bad_shapes:
        problems.append(
            f"config does not fit the weights for {len(bad_shapes)} tensors: {_preview(bad_shapes)}"
        )
    if problems:
        raise CheckpointError(f"{what} does not match the configs: " + "; ".join(problems))


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
