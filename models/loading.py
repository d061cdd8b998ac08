"""Loading real checkpoints: a diffusers-format folder or an original single-file checkpoint.

Every network is built on the meta device from its config, then receives its weights with
`load_state_dict(assign=True)` after our own checks, so a missing key, an unexpected key or a tensor
whose shape does not fit the config is an error that names it, never a silent partial load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.configs import UNetConfig, VAEConfig
from models.noise_schedule import NoiseSchedule
from models.single_file import CheckpointError, detect_variant, ldm_to_diffusers, read_checkpoint
from models.stable_diffusion import StableDiffusion
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL, convert_deprecated_vae_attention_keys
from schemas.samplers import UnknownName, check_pair, resolve_sampler, resolve_scheduler

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
TOKENIZER_ASSETS = PACKAGE_DIR / "assets" / "clip_tokenizer"
SINGLE_FILE_CONFIGS = {
    "sd1": PACKAGE_DIR / "reference_configs" / "sd1",
    "sd2": PACKAGE_DIR / "reference_configs" / "sd2",
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Weight file names in a diffusers folder, by preference (fp16 variants last).
_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
# Keys real checkpoints carry that hold no weights we need (old transformers saved this buffer).
_IGNORED_TEXT_KEYS = {"text_model.embeddings.position_ids", "embeddings.position_ids"}


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    vae_dtype: torch.dtype | None = None,
    vae_fallback: bool = False,
    config: str | Path | None = None,
) -> StableDiffusion:
    """Load a diffusers-format folder or a single-file checkpoint, ready for inference.

    `vae_fallback`: with a float16 VAE, also keep a float32 copy of its decoder for latents whose
    float16 decode overflows (StableDiffusion.keep_float32_decoder); ignored for other dtypes.
    `config`: for a single file, a diffusers-format folder holding the configs (no weights needed);
    default: the shipped SD 1.5 or SD 2.1 configs, chosen from the checkpoint's keys.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if path.is_dir():
        model = load_diffusers_folder(path)
    elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        model = load_single_file(path, config)
    else:
        raise CheckpointError(
            f"{path} is neither a diffusers-format folder nor a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)})"
        )
    if vae_fallback and (vae_dtype or dtype) == torch.float16:
        model.keep_float32_decoder()  # while the weights are still the checkpoint's float32 ones
    return model.to(device=device, dtype=dtype, vae_dtype=vae_dtype).eval()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"missing config file {path}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_diffusers_folder(folder: Path) -> StableDiffusion:
    """A folder laid out as diffusers saves it: model_index.json, unet/, vae/, text_encoder/, ..."""
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is not a diffusers-format folder: model_index.json is missing")
    configs = read_component_configs(folder)
    weights = {name: read_checkpoint(_weight_file(folder / name, name)) for name in _WEIGHT_NAMES}
    model = build_model(folder.name, configs, weights, tokenizer_dir=folder / "tokenizer")
    model.recommended = read_recommended(folder / "defaults.json")
    return model


def read_recommended(path: Path) -> dict[str, Any]:
    """A model folder's optional defaults.json: {"steps": int, "guidance_scale": float, "sampler":
    name, "scheduler": name} (any may be left out; names as in schemas/samplers.py, aliases
    included). Not part of the diffusers format: our embedded model ships one."""
    if not path.is_file():
        return {}
    data = read_json(path)
    numbers = {"steps": int, "guidance_scale": (int, float)}
    recommended: dict[str, Any] = {}
    for key, value in data.items():
        if key in numbers:
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers[key])
                or value < (1 if key == "steps" else 0)
            ):
                kind = "positive integer" if key == "steps" else "number >= 0"
                raise CheckpointError(f"{path}: {key} must be a {kind}, got {value!r}")
            recommended[key] = value
        elif key in ("sampler", "scheduler"):
            if not isinstance(value, str):
                raise CheckpointError(f"{path}: {key} must be a name, got {value!r}")
            try:
                if key == "sampler":
                    recommended["sampler"], implied = resolve_sampler(value)
                    if implied is not None:
                        recommended.setdefault("scheduler", implied)
                else:
                    recommended["scheduler"] = resolve_scheduler(value)
            except UnknownName as error:
                raise CheckpointError(f"{path}: {error}") from None
        # other keys: free-form notes may sit beside the settings
    if "sampler" in recommended and "scheduler" in recommended:
        try:
            check_pair(recommended["sampler"], recommended["scheduler"])
        except UnknownName as error:
            raise CheckpointError(f"{path}: {error}") from None
    return recommended


def load_single_file(path: Path, config: str | Path | None = None) -> StableDiffusion:
    """An original CompVis/Stability checkpoint (SD 1.x or 2.x), mapped onto our modules."""
    state_dict = read_checkpoint(path)
    variant = detect_variant(state_dict)
    config_dir = Path(config) if config is not None else SINGLE_FILE_CONFIGS[variant]
    configs = read_component_configs(config_dir)
    logger.info("%s: detected an SD %s checkpoint, configs from %s", path.name, variant[-1], config_dir)
    weights = ldm_to_diffusers(state_dict, configs)
    return build_model(path.stem, configs, weights, tokenizer_dir=config_dir / "tokenizer")


def read_component_configs(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        "unet": read_json(folder / "unet" / "config.json"),
        "vae": read_json(folder / "vae" / "config.json"),
        "text_encoder": read_json(folder / "text_encoder" / "config.json"),
        "scheduler": read_json(folder / "scheduler" / "scheduler_config.json"),
    }


def build_model(
    name: str,
    configs: dict[str, dict[str, Any]],
    weights: dict[str, dict[str, torch.Tensor]],
    tokenizer_dir: Path,
) -> StableDiffusion:
    """Build every network from its config and give it its weights, checking every key and shape."""
    try:
        unet_config = UNetConfig.from_dict(configs["unet"])
        vae_config = VAEConfig.from_dict(configs["vae"])
        text_config = CLIPTextConfig.from_dict(configs["text_encoder"])
        schedule = NoiseSchedule.from_config(configs["scheduler"])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{name}: invalid config: {err}") from err

    with torch.device("meta"):
        unet = UNet2DConditionModel(unet_config)
        vae = AutoencoderKL(vae_config)
        text_encoder = CLIPTextModel(text_config)
    assign_weights(unet, weights["unet"], f"{name} unet")
    assign_weights(vae, convert_deprecated_vae_attention_keys(weights["vae"]), f"{name} vae")
    assign_weights(
        text_encoder, _match_text_prefix(text_encoder, weights["text_encoder"]), f"{name} text_encoder"
    )
    _materialize_position_ids(text_encoder)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > text_config.vocab_size:
        raise CheckpointError(
            f"{name}: the tokenizer has {len(tokenizer)} tokens but the text encoder only {text_config.vocab_size}"
        )
    return StableDiffusion(name, unet, vae, text_encoder, tokenizer, schedule)


def assign_weights(
    module: nn.Module, state_dict: dict[str, torch.Tensor], what: str, ignored: Iterable[str] = ()
) -> None:
    """Load `state_dict` into a module built on the meta device; every key and shape must match."""
    expected = module.state_dict()
    given = {k: v for k, v in state_dict.items() if k not in set(ignored)}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
        raise CheckpointError(f"{what}: the weights do not match the architecture: " + "; ".join(parts))
    for key, tensor in given.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{what}: the config does not fit the weights: {key} has shape {tuple(tensor.shape)}, "
                f"the config gives {tuple(expected[key].shape)}"
            )
        if not tensor.is_floating_point() and expected[key].is_floating_point():
            raise CheckpointError(f"{what}: {key} holds {tensor.dtype} values, expected floating point")
    # assign=True keeps the loaded tensors (no second copy); cast to one float dtype first
    dtype = next((v.dtype for v in expected.values() if v.is_floating_point()), torch.float32)
    module.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in given.items()}, assign=True
    )


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """The CLIP tokenizer of a model folder.

    A folder may hold only tokenizer_config.json / special_tokens_map.json (our shipped configs):
    the BPE vocabulary then comes from the copy shipped in models/assets, with the folder's special
    tokens (SD 2.x pads with "!").
    """
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        source, overrides = folder, {}
    else:
        source = TOKENIZER_ASSETS
        overrides = (
            read_json(folder / "special_tokens_map.json")
            if (folder / "special_tokens_map.json").is_file()
            else {}
        )
        overrides = {k: v["content"] if isinstance(v, dict) else v for k, v in overrides.items()}
    try:
        # from_pretrained(folder): transformers 5's CLIPTokenizer(vocab_file=..., merges_file=...) is broken
        tokenizer = CLIPTokenizer.from_pretrained(str(source), local_files_only=True, **overrides)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the CLIP tokenizer from {source}: {err}") from err
    return tokenizer


def _weight_file(component_dir: Path, component: str) -> Path:
    names = _WEIGHT_NAMES[component]
    candidates = [component_dir / n for n in names]
    candidates += [component_dir / n.replace(".", ".fp16.", 1) for n in names]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if any(component_dir.glob("*.index.json")):
        raise CheckpointError(f"{component_dir}: sharded weights are not supported")
    raise CheckpointError(f"{component_dir}: no weights file (looked for {', '.join(names)})")


def _match_text_prefix(model: CLIPTextModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept text-encoder keys with or without the `text_model.` prefix (transformers 5 drops it)."""
    prefix = "text_model."
    wants_prefix = any(k.startswith(prefix) for k in model.state_dict())
    result = {}
    for key, value in state_dict.items():
        if key in _IGNORED_TEXT_KEYS:
            continue
        bare = key[len(prefix) :] if key.startswith(prefix) else key
        result[prefix + bare if wants_prefix else bare] = value
    return result


def _materialize_position_ids(model: nn.Module) -> None:
    """CLIP's position_ids is a non-persistent buffer: not in the weights, so still on meta."""
    for module in model.modules():
        buffer = module._buffers.get("position_ids")
        if buffer is not None and buffer.is_meta:
            module.register_buffer(
                "position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False
            )


def _preview(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
