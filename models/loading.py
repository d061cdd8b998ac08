"""Loading real checkpoints: a diffusers-format folder or an original single-file checkpoint.

SD 1.x, SD 2.x and SDXL base: the family is read from the folder's components (`text_encoder_2`
and `tokenizer_2`: SDXL) or from the single file's keys; what we do not run (an SDXL refiner or
inpainting model, SD3, Flux, ...) is refused naming what was found. Every network is built on the
meta device from its config, then receives its weights with `load_state_dict(assign=True)` after
our own checks, so a missing key, an unexpected key or a tensor whose shape does not fit the config
is an error that names it, never a silent partial load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models.configs import UNetConfig, VAEConfig
from models.noise_schedule import NoiseSchedule
from models.single_file import UNET_PREFIX, CheckpointError, detect_variant, ldm_to_diffusers, read_checkpoint
from models.stable_diffusion import StableDiffusion
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL, convert_deprecated_vae_attention_keys
from schemas.samplers import UnknownName, check_pair, resolve_sampler, resolve_scheduler
from schemas.vocabulary import VOCABULARY_FILE, words_of

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
TOKENIZER_ASSETS = PACKAGE_DIR / "assets" / "clip_tokenizer"
SINGLE_FILE_CONFIGS = {
    "sd1": PACKAGE_DIR / "reference_configs" / "sd1",
    "sd2": PACKAGE_DIR / "reference_configs" / "sd2",
    "sdxl": PACKAGE_DIR / "reference_configs" / "sdxl",
}
VARIANT_LABELS = {"sd1": "SD 1", "sd2": "SD 2", "sdxl": "SDXL"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Weight file names in a diffusers folder, by preference (fp16 variants last).
_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin"),  # SDXL only
}
# Pipelines whose folders we cannot run, by model_index.json's _class_name: what to tell the user.
_UNSUPPORTED_PIPELINES = {
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner / img2img pipeline",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting pipeline",
    "StableDiffusion3Pipeline": "SD3 (an MMDiT transformer, three text encoders)",
    "FluxPipeline": "Flux (a transformer, T5 and CLIP text encoders)",
}
# A model_index.json's own keys (not components).
_INDEX_OPTIONS = {
    "force_zeros_for_empty_prompt",
    "requires_safety_checker",
    "add_watermarker",
    "requires_aesthetics_score",
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
    default: the shipped SD 1.5, SD 2.1 or SDXL base configs, chosen from the checkpoint's keys.
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
    """A folder laid out as diffusers saves it: model_index.json, unet/, vae/, text_encoder/, ...
    (SDXL: also text_encoder_2/ and tokenizer_2/)."""
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is not a diffusers-format folder: model_index.json is missing")
    index = read_json(folder / "model_index.json")
    sdxl = folder_is_sdxl(folder, index)
    configs = read_component_configs(folder)
    names = [name for name in _WEIGHT_NAMES if name != "text_encoder_2" or sdxl]
    weights = {name: read_checkpoint(_weight_file(folder / name, name)) for name in names}
    model = build_model(
        folder.name,
        configs,
        weights,
        tokenizer_dir=folder / "tokenizer",
        tokenizer_2_dir=folder / "tokenizer_2" if sdxl else None,
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
    )
    model.recommended = read_recommended(folder / "defaults.json")
    model.vocabulary = read_vocabulary(folder / VOCABULARY_FILE)
    return model


def folder_is_sdxl(folder: Path, index: dict[str, Any]) -> bool:
    """Whether a diffusers folder is an SDXL base model (its model_index.json lists text_encoder_2 and
    tokenizer_2); raise CheckpointError naming the pipeline of a folder we cannot run."""
    class_name = index.get("_class_name")
    if class_name in _UNSUPPORTED_PIPELINES:
        raise CheckpointError(
            f"{folder.name}: {class_name} is {_UNSUPPORTED_PIPELINES[class_name]}: not supported"
        )

    def listed(name: str) -> bool:
        value = index.get(name)
        return isinstance(value, list) and len(value) == 2 and value[0] is not None

    components = sorted(k for k in index if not k.startswith("_") and k not in _INDEX_OPTIONS and listed(k))
    unknown = [c for c in components if c in ("transformer", "text_encoder_3", "tokenizer_3", "prior")]
    if unknown:
        raise CheckpointError(
            f"{folder.name}: a {class_name or 'diffusers'} folder with {', '.join(unknown)}: not a Stable "
            "Diffusion UNet model (SD 1.x, 2.x, SDXL base); not supported"
        )
    if index.get("requires_aesthetics_score") or (listed("text_encoder_2") and not listed("text_encoder")):
        raise CheckpointError(
            f"{folder.name}: an SDXL refiner (only text_encoder_2, an aesthetic-score UNet): not supported, "
            "only SDXL base models are"
        )
    if listed("text_encoder_2") != listed("tokenizer_2"):
        raise CheckpointError(
            f"{folder.name}: model_index.json lists one of text_encoder_2 and tokenizer_2 without the other"
        )
    return listed("text_encoder_2")


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


def read_vocabulary(path: Path) -> frozenset[str] | None:
    """A model folder's optional vocabulary.json (training/train.py writes one): a JSON list of the
    words of its training captions, each as schemas/vocabulary.py splits text. None without one."""
    if not path.is_file():
        return None
    try:
        words = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(words, list) or not all(isinstance(w, str) and words_of(w) == [w] for w in words):
        raise CheckpointError(f"{path} must hold a JSON list of lowercase words, got {str(words)[:80]}")
    return frozenset(words)


def load_single_file(path: Path, config: str | Path | None = None) -> StableDiffusion:
    """An original CompVis/Stability checkpoint (SD 1.x, 2.x or SDXL base), mapped onto our modules."""
    state_dict = read_checkpoint(path)
    variant = detect_variant(state_dict)
    config_dir = Path(config) if config is not None else SINGLE_FILE_CONFIGS[variant]
    configs = read_component_configs(config_dir)
    sdxl = variant == "sdxl"
    if sdxl != ("text_encoder_2" in configs):
        raise CheckpointError(
            f"{path.name} is an {VARIANT_LABELS[variant]} checkpoint but the configs in {config_dir} are "
            f"{'not ' if sdxl else ''}SDXL's (text_encoder_2/ {'missing' if sdxl else 'present'})"
        )
    logger.info(
        "%s: detected an %s checkpoint, configs from %s", path.name, VARIANT_LABELS[variant], config_dir
    )
    # an inpainting checkpoint (SD 1.5/2 inpainting) is told by its UNet's first convolution: 9 input
    # channels (latent, mask, masked-image latent) where the shipped configs say 4
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.dim() == 4:
        configs["unet"]["in_channels"] = int(conv_in.shape[1])
    weights = ldm_to_diffusers(state_dict, configs)
    index_path = config_dir / "model_index.json"
    index = read_json(index_path) if index_path.is_file() else {}
    return build_model(
        path.stem,
        configs,
        weights,
        tokenizer_dir=config_dir / "tokenizer",
        tokenizer_2_dir=config_dir / "tokenizer_2" if sdxl else None,
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
    )


def read_component_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """The components' config.json contents (and "text_encoder_2" when the folder has one: SDXL)."""
    configs = {
        "unet": read_json(folder / "unet" / "config.json"),
        "vae": read_json(folder / "vae" / "config.json"),
        "text_encoder": read_json(folder / "text_encoder" / "config.json"),
        "scheduler": read_json(folder / "scheduler" / "scheduler_config.json"),
    }
    if (folder / "text_encoder_2" / "config.json").is_file():
        configs["text_encoder_2"] = read_json(folder / "text_encoder_2" / "config.json")
    return configs


def build_model(
    name: str,
    configs: dict[str, dict[str, Any]],
    weights: dict[str, dict[str, torch.Tensor]],
    tokenizer_dir: Path,
    tokenizer_2_dir: Path | None = None,
    force_zeros_for_empty_prompt: bool | None = None,
) -> StableDiffusion:
    """Build every network from its config and give it its weights, checking every key and shape.

    With `tokenizer_2_dir` (and configs["text_encoder_2"]) an SDXL model: its second text encoder
    and tokenizer too; `force_zeros_for_empty_prompt` None is diffusers' SDXL default, true."""
    sdxl = tokenizer_2_dir is not None
    try:
        unet_config = UNetConfig.from_dict(configs["unet"])
        vae_config = VAEConfig.from_dict(configs["vae"])
        text_config = CLIPTextConfig.from_dict(configs["text_encoder"])
        text_config_2 = CLIPTextConfig.from_dict(configs["text_encoder_2"]) if sdxl else None
        schedule = NoiseSchedule.from_config(configs["scheduler"])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{name}: invalid config: {err}") from err
    latent = vae_config.latent_channels
    if unet_config.out_channels != latent or unet_config.in_channels not in (latent, 2 * latent + 1):
        raise CheckpointError(
            f"{name}: a UNet taking {unet_config.in_channels} input channels and giving "
            f"{unet_config.out_channels} for a {latent}-channel VAE: supported are {latent} in and out "
            f"(text-to-image) and {2 * latent + 1} in (inpainting: latent, mask, masked-image latent)"
        )
    check_family_configs(name, unet_config, text_config, text_config_2)

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
    model = StableDiffusion(name, unet, vae, text_encoder, tokenizer, schedule)
    if text_config_2 is not None and tokenizer_2_dir is not None:
        with torch.device("meta"):
            text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
        assign_weights(
            text_encoder_2,
            _match_text_prefix(text_encoder_2, weights["text_encoder_2"]),
            f"{name} text_encoder_2",
        )
        _materialize_position_ids(text_encoder_2)
        tokenizer_2 = load_tokenizer(tokenizer_2_dir)
        if len(tokenizer_2) > text_config_2.vocab_size:
            raise CheckpointError(
                f"{name}: tokenizer_2 has {len(tokenizer_2)} tokens but text_encoder_2 only {text_config_2.vocab_size}"
            )
        model.text_encoder_2, model.tokenizer_2 = text_encoder_2, tokenizer_2
        model.force_zeros_for_empty_prompt = (
            True if force_zeros_for_empty_prompt is None else bool(force_zeros_for_empty_prompt)
        )
    return model


def check_family_configs(
    name: str, unet: UNetConfig, text: CLIPTextConfig, text_2: CLIPTextConfig | None
) -> None:
    """The UNet must take what the text encoders give: SD 1.x/2.x's context width, or SDXL's two
    contexts side by side and bigG's pooled embedding with six size numbers (a refiner's UNet takes
    an aesthetic score instead: five numbers, another width)."""
    if text_2 is None:
        if unet.addition_embed_type is not None:
            raise CheckpointError(
                f"{name}: the UNet has SDXL's added conditioning (addition_embed_type "
                f"{unet.addition_embed_type!r}) but the model has one text encoder: an SDXL model needs "
                "text_encoder_2 and tokenizer_2"
            )
        return
    if unet.addition_embed_type != "text_time":
        raise CheckpointError(
            f"{name}: two text encoders (SDXL) but the UNet has no addition_embed_type 'text_time'"
        )
    if unet.in_channels != 4:
        raise CheckpointError(
            f"{name}: an SDXL UNet with in_channels {unet.in_channels} (inpainting: 9): not supported, "
            "only text-to-image SDXL (4) is"
        )
    if unet.text_embeds_dim != text_2.projection_dim:
        raise CheckpointError(
            f"{name}: the UNet's added embedding takes {unet.projection_class_embeddings_input_dim} features "
            f"= 6 x {unet.addition_time_embed_dim} (size numbers) + {unet.text_embeds_dim}, but text_encoder_2's "
            f"pooled output has projection_dim {text_2.projection_dim}: not an SDXL base UNet (a refiner takes "
            "an aesthetic score, 5 numbers); not supported"
        )
    context = text.hidden_size + text_2.hidden_size
    if set(unet.cross_attention_dim) != {context}:
        raise CheckpointError(
            f"{name}: the UNet's cross_attention_dim {unet.cross_attention_dim[0]} is not the two text encoders' "
            f"hidden sizes side by side ({text.hidden_size} + {text_2.hidden_size} = {context})"
        )


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


def _match_text_prefix(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept text-encoder keys with or without the `text_model.` prefix (transformers 5 drops it from
    CLIPTextModel; CLIPTextModelWithProjection keeps it, beside its `text_projection`)."""
    prefix = "text_model."
    model_keys = set(model.state_dict())
    wants_prefix = any(k.startswith(prefix) for k in model_keys)
    result = {}
    for key, value in state_dict.items():
        if key in _IGNORED_TEXT_KEYS:
            continue
        if key in model_keys:
            result[key] = value
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
