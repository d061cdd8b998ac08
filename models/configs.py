"""Architecture configs of the UNet and the KL autoencoder, read from diffusers' `config.json` dicts.

`from_dict` accepts exactly the subset of diffusers' `UNet2DConditionModel` / `AutoencoderKL`
options that Stable Diffusion 1.x/2.x and SDXL use. A key whose value would change the architecture in a
way we do not implement raises `ValueError` naming the key, its value and what is supported, so
an unsupported checkpoint fails at load time instead of producing wrong pictures. Keys starting
with `_` (`_class_name`, `_diffusers_version`, ...) and keys that do not change inference
(`dropout`) are ignored. `to_dict` writes a diffusers-style dict that `from_dict` (and diffusers)
read back to the same architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

UNET_DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
UNET_MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"
VAE_DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
VAE_UP_BLOCK_TYPE = "UpDecoderBlock2D"
SUPPORTED_ACT_FN = "silu"

_MISSING = object()

# size/crop numbers of SDXL's added conditioning: original (height, width), crop (top, left),
# target (height, width)
TIME_IDS = 6

# UNet keys that must keep diffusers' default value (or one of the listed equivalent values):
# any other value selects a layer or embedding this implementation does not have.
_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "mid_block_type": (UNET_MID_BLOCK_TYPE,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
# keys with no effect on inference of the supported architecture
_UNET_IGNORED = frozenset({"dropout", "addition_embed_type_num_heads"})
# the one added conditioning we implement: SDXL's pooled text embedding and size/crop numbers
ADDITION_EMBED_TYPES = (None, "text_time")

_VAE_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}
_VAE_IGNORED: frozenset[str] = frozenset()


def _fail(key: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"unsupported config value {key}={value!r}; supported: {supported}")


def _check_fixed(d: dict[str, Any], fixed: dict[str, tuple[Any, ...]]) -> None:
    for key, allowed in fixed.items():
        value = d.get(key, _MISSING)
        if value is _MISSING:
            continue
        if key == "only_cross_attention" and isinstance(value, list) and not any(value):
            continue  # a per-block list of False is the same as False
        # True == 1 in Python: compare bool-ness too, so `downsample_padding: true` is rejected
        if not any(value == a and (isinstance(value, bool) == isinstance(a, bool)) for a in allowed):
            raise _fail(
                key, value, " or ".join(json.dumps(a) for a in allowed) + " (as written in config.json)"
            )


def _check_unknown(d: dict[str, Any], known: set[str], component: str) -> None:
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(
            f"unknown {component} config key(s) {unknown}: they may change the architecture and are not "
            f"supported; known keys: {sorted(known)}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_block(key: str, value: Any, num_blocks: int, *, positive: bool = True) -> tuple[int, ...]:
    """An int (same for every block) or a list with one int per down block, as a tuple."""
    values = [value] * num_blocks if _is_int(value) else value
    if not isinstance(values, (list, tuple)) or not all(_is_int(v) for v in values):
        raise _fail(key, value, f"an int or a list of {num_blocks} ints (one per down block)")
    if len(values) != num_blocks:
        raise ValueError(
            f"{key} has {len(values)} entries but there are {num_blocks} down blocks "
            f"(block_out_channels); give one value per block or a single int"
        )
    if positive and any(v <= 0 for v in values):
        raise _fail(key, value, "positive ints")
    return tuple(values)


def _sample_size(value: Any) -> int | tuple[int, int] | None:
    if value is None or _is_int(value):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
        return (value[0], value[1])
    raise _fail("sample_size", value, "null, an int or [height, width]")


def _block_types(key: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(key, value, f"a non-empty list of block type names from {list(allowed)}")
    for name in value:
        if name not in allowed:
            raise _fail(key, value, f"block types {list(allowed)}, got {name!r}")
    return tuple(value)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a Stable Diffusion 1.x/2.x or SDXL `UNet2DConditionModel`.

    Field defaults are SD 1.5's; `from_dict` fills keys missing from a config.json with diffusers'
    defaults instead, as diffusers does. Per-block values are tuples with one entry per down block (up blocks use them reversed, the
    mid block uses the last one). `num_attention_heads` is the real number of heads per block:
    diffusers' config key `attention_head_dim` holds the head COUNT for SD 1.x/2.x (a historical
    misnomer kept for compatibility), unless `num_attention_heads` is set.
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | tuple[int, int] | None = 64  # latent side, in latent pixels
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    center_input_sample: bool = False
    # LCM-distilled UNets: width of the guidance-scale embedding added to the timestep embedding
    # (None: no such input, the guidance is classifier-free)
    time_cond_proj_dim: int | None = None
    # SDXL's added conditioning ("text_time"; None: none): the pooled text embedding and the size/crop
    # numbers, each number through a sinusoidal embedding `addition_time_embed_dim` wide, all
    # concatenated (`projection_class_embeddings_input_dim` wide) through an MLP (diffusers'
    # `add_embedding`) added to the timestep embedding
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels must not be empty")
        for key in (
            "down_block_types",
            "up_block_types",
            "layers_per_block",
            "num_attention_heads",
            "transformer_layers_per_block",
            "cross_attention_dim",
        ):
            if len(getattr(self, key)) != n:
                raise ValueError(
                    f"{key} has {len(getattr(self, key))} entries, block_out_channels has {n}: "
                    "they must have one entry per block"
                )
        _block_types("down_block_types", self.down_block_types, UNET_DOWN_BLOCK_TYPES)
        _block_types("up_block_types", self.up_block_types, UNET_UP_BLOCK_TYPES)
        self._check_addition_embedding()
        for i, (channels, heads) in enumerate(
            zip(self.block_out_channels, self.num_attention_heads, strict=True)
        ):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels[{i}]={channels} is not divisible by norm_num_groups={self.norm_num_groups}"
                )
            if channels % heads:
                raise ValueError(
                    f"block {i}: {channels} channels cannot be split into {heads} attention heads "
                    "(attention_head_dim / num_attention_heads must divide block_out_channels)"
                )

    def _check_addition_embedding(self) -> None:
        dims = {
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
        }
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise _fail("addition_embed_type", self.addition_embed_type, 'null or "text_time" (SDXL)')
        if self.addition_embed_type is None:
            for key, value in dims.items():
                if value is not None:
                    raise _fail(key, value, 'null unless addition_embed_type is "text_time" (SDXL)')
            return
        if any(value is None for value in dims.values()):
            raise _fail(
                "addition_embed_type",
                self.addition_embed_type,
                '"text_time" with addition_time_embed_dim and projection_class_embeddings_input_dim set',
            )
        if self.text_embeds_dim <= 0:
            raise _fail(
                "projection_class_embeddings_input_dim",
                self.projection_class_embeddings_input_dim,
                f"more than {TIME_IDS} x addition_time_embed_dim ({self.addition_time_embed_dim}): the "
                "pooled text embedding comes on top of the size numbers",
            )

    @property
    def text_embeds_dim(self) -> int:
        """Width of the pooled text embedding a "text_time" UNet takes (1280 for SDXL): what the added
        embedding's input holds beside the TIME_IDS size/crop numbers' embeddings; 0 without one."""
        if self.addition_embed_type is None:
            return 0
        assert self.projection_class_embeddings_input_dim is not None
        assert self.addition_time_embed_dim is not None
        return self.projection_class_embeddings_input_dim - TIME_IDS * self.addition_time_embed_dim

    @property
    def num_downsamples(self) -> int:
        """How many times the latent is halved (the last down block does not downsample)."""
        return len(self.block_out_channels) - 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Read a diffusers `unet/config.json` dict; raise `ValueError` on anything unsupported."""
        known = (
            set(_UNET_FIXED)
            | set(_UNET_IGNORED)
            | {f for f in cls.__dataclass_fields__}
            | {"attention_head_dim"}
        )
        _check_unknown(d, known, "UNet")
        _check_fixed(d, _UNET_FIXED)
        channels = d.get("block_out_channels", list(cls.block_out_channels))
        if not isinstance(channels, (list, tuple)) or not channels or not all(_is_int(c) for c in channels):
            raise _fail("block_out_channels", channels, "a non-empty list of ints")
        n = len(channels)
        down = _block_types(
            "down_block_types", d.get("down_block_types", list(cls.down_block_types)), UNET_DOWN_BLOCK_TYPES
        )
        up = _block_types(
            "up_block_types", d.get("up_block_types", list(cls.up_block_types)), UNET_UP_BLOCK_TYPES
        )
        for key, types in (("down_block_types", down), ("up_block_types", up)):
            if len(types) != n:
                raise ValueError(
                    f"{key} has {len(types)} entries, block_out_channels has {n}: one block type per block"
                )
        # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`
        heads_key = (
            "num_attention_heads" if d.get("num_attention_heads") is not None else "attention_head_dim"
        )
        heads = _per_block(heads_key, d.get(heads_key, 8), n)
        cross_dim = _per_block("cross_attention_dim", d.get("cross_attention_dim", 1280), n)
        groups = d.get("norm_num_groups", 32)
        if not _is_int(groups) or groups <= 0:
            raise _fail(
                "norm_num_groups", groups, "a positive int (null, meaning no output norm, is not supported)"
            )
        return cls(
            block_out_channels=tuple(channels),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=_per_block("layers_per_block", d.get("layers_per_block", 2), n),
            num_attention_heads=heads,
            transformer_layers_per_block=_per_block(
                "transformer_layers_per_block", d.get("transformer_layers_per_block", 1), n
            ),
            cross_attention_dim=cross_dim,
            in_channels=_positive_int(d, "in_channels", 4),
            out_channels=_positive_int(d, "out_channels", 4),
            sample_size=_sample_size(d.get("sample_size")),
            use_linear_projection=_bool(d, "use_linear_projection", False),
            # null in SDXL's config.json: diffusers takes it as false
            upcast_attention=_bool(d, "upcast_attention", False, null_is_default=True),
            norm_num_groups=groups,
            norm_eps=_float(d, "norm_eps", 1e-5),
            flip_sin_to_cos=_bool(d, "flip_sin_to_cos", True),
            freq_shift=_float(d, "freq_shift", 0),
            center_input_sample=_bool(d, "center_input_sample", False),
            time_cond_proj_dim=_optional_positive_int(d, "time_cond_proj_dim"),
            addition_embed_type=d.get("addition_embed_type"),
            addition_time_embed_dim=_optional_positive_int(d, "addition_time_embed_dim"),
            projection_class_embeddings_input_dim=_optional_positive_int(
                d, "projection_class_embeddings_input_dim"
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-style config dict (heads under `attention_head_dim`, diffusers' convention)."""

        def compact(values: tuple[int, ...]) -> int | list[int]:
            return values[0] if len(set(values)) == 1 else list(values)

        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": list(self.sample_size)
            if isinstance(self.sample_size, tuple)
            else self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": list(self.down_block_types),
            "mid_block_type": UNET_MID_BLOCK_TYPE,
            "up_block_types": list(self.up_block_types),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": compact(self.layers_per_block),
            "act_fn": SUPPORTED_ACT_FN,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "cross_attention_dim": compact(self.cross_attention_dim),
            "transformer_layers_per_block": compact(self.transformer_layers_per_block),
            "attention_head_dim": compact(self.num_attention_heads),
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            # only when set, as diffusers' SD 1.x/2.x configs leave it out
            **({} if self.time_cond_proj_dim is None else {"time_cond_proj_dim": self.time_cond_proj_dim}),
            **(
                {}
                if self.addition_embed_type is None
                else {
                    "addition_embed_type": self.addition_embed_type,
                    "addition_time_embed_dim": self.addition_time_embed_dim,
                    "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
                }
            ),
        }


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Stable Diffusion `AutoencoderKL` (KL-f8 for 4 blocks).

    Field defaults are SD's; `from_dict` fills keys missing from a config.json with diffusers'
    defaults instead, as diffusers does.
    """

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] | None = 512  # image side, in pixels
    scaling_factor: float = 0.18215  # latents are multiplied by this before diffusion
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True  # a hint for pipelines: run this VAE in float32 when the rest is float16

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        for i, channels in enumerate(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels[{i}]={channels} is not divisible by norm_num_groups={self.norm_num_groups}"
                )

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Read a diffusers `vae/config.json` dict; raise `ValueError` on anything unsupported."""
        known = (
            set(_VAE_FIXED)
            | set(_VAE_IGNORED)
            | set(cls.__dataclass_fields__)
            | {"down_block_types", "up_block_types"}
        )
        _check_unknown(d, known, "VAE")
        _check_fixed(d, _VAE_FIXED)
        channels = d.get("block_out_channels", [64])
        if not isinstance(channels, (list, tuple)) or not channels or not all(_is_int(c) for c in channels):
            raise _fail("block_out_channels", channels, "a non-empty list of ints")
        n = len(channels)
        for key, allowed in (
            ("down_block_types", VAE_DOWN_BLOCK_TYPE),
            ("up_block_types", VAE_UP_BLOCK_TYPE),
        ):
            types = _block_types(key, d.get(key, [allowed] * n), (allowed,))
            if len(types) != n:
                raise ValueError(f"{key} has {len(types)} entries, block_out_channels has {n}: one per block")
        return cls(
            block_out_channels=tuple(channels),
            layers_per_block=_positive_int(d, "layers_per_block", 1),
            in_channels=_positive_int(d, "in_channels", 3),
            out_channels=_positive_int(d, "out_channels", 3),
            latent_channels=_positive_int(d, "latent_channels", 4),
            norm_num_groups=_positive_int(d, "norm_num_groups", 32),
            sample_size=_sample_size(d.get("sample_size", 32)),
            scaling_factor=_float(d, "scaling_factor", 0.18215),
            use_quant_conv=_bool(d, "use_quant_conv", True),
            use_post_quant_conv=_bool(d, "use_post_quant_conv", True),
            mid_block_add_attention=_bool(d, "mid_block_add_attention", True),
            force_upcast=_bool(d, "force_upcast", True),
        )

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-style config dict."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [VAE_DOWN_BLOCK_TYPE] * n,
            "up_block_types": [VAE_UP_BLOCK_TYPE] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": SUPPORTED_ACT_FN,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": list(self.sample_size)
            if isinstance(self.sample_size, tuple)
            else self.sample_size,
            "scaling_factor": self.scaling_factor,
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


def _positive_int(d: dict[str, Any], key: str, default: int) -> int:
    value = d.get(key, default)
    if not _is_int(value) or value <= 0:
        raise _fail(key, value, "a positive int")
    return value


def _optional_positive_int(d: dict[str, Any], key: str) -> int | None:
    value = d.get(key)
    if value is not None and (not _is_int(value) or value <= 0):
        raise _fail(key, value, "null or a positive int")
    return value


def _bool(d: dict[str, Any], key: str, default: bool, null_is_default: bool = False) -> bool:
    value = d.get(key, default)
    if value is None and null_is_default:
        return default
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def _float(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, value, "a number")
    return float(value)
