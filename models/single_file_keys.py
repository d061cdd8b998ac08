"""Key tables between original single-file SD checkpoints ("ldm" layout) and diffusers naming.

Each table lists, for one component and config, every tensor the config requires: its ldm key,
the diffusers key(s) it holds and its shape on both sides. Reading and writing single files
(`models/single_file.py`) both walk these tables, so the two directions cannot drift apart, and
a key the config requires but a file lacks, or a tensor whose shape does not fit, is found by name.

The ldm names follow CompVis `ldm/modules/diffusionmodules/openaimodel.py` (UNet; SDXL's Stability
`sgm` copy adds `label_emb`), `model.py` (VAE), HF `CLIPTextModel` (SD 1.x text tower, SDXL's first)
and OpenCLIP's text transformer (SD 2.x, SDXL's second); diffusers' own
`loaders/single_file_utils.py` reads the same names (the tests check this).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.configs import UNetConfig, VAEConfig

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorMap:
    """One tensor of a single-file checkpoint and the diffusers tensor(s) it holds.

    kind "copy": same tensor; "conv1x1": the ldm file holds a linear weight (out, in) as a 1x1 conv
    (out, in, 1, 1); "concat": the ldm tensor is the diffusers tensors concatenated along dim 0
    (OpenCLIP's fused q/k/v `in_proj`); "transpose": the ldm tensor is the diffusers weight (out, in)
    transposed (OpenCLIP's `text_projection`, applied as `x @ text_projection`).
    """

    ldm_key: str
    diffusers_keys: tuple[str, ...]
    shape: Shape  # diffusers shape of each diffusers key
    kind: str = "copy"

    @property
    def ldm_shape(self) -> Shape:
        if self.kind == "conv1x1":
            return (*self.shape, 1, 1)
        if self.kind == "concat":
            return (self.shape[0] * len(self.diffusers_keys), *self.shape[1:])
        if self.kind == "transpose":
            return self.shape[::-1]
        return self.shape

    def accepts_ldm_shape(self, shape: Sequence[int]) -> bool:
        """Whether an ldm tensor of this shape fits (1x1-conv weights may also come already linear)."""
        return tuple(shape) == self.ldm_shape or (self.kind == "conv1x1" and tuple(shape) == self.shape)

    def to_diffusers(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.kind == "conv1x1":
            return {self.diffusers_keys[0]: tensor.reshape(self.shape)}
        if self.kind == "concat":
            parts = tensor.chunk(len(self.diffusers_keys), dim=0)
            # clone: views of one storage could not be saved with safetensors
            return {key: part.clone() for key, part in zip(self.diffusers_keys, parts, strict=True)}
        if self.kind == "transpose":
            return {self.diffusers_keys[0]: tensor.T.contiguous()}
        return {self.diffusers_keys[0]: tensor}

    def to_ldm(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.kind == "conv1x1":
            return tensors[0].reshape(self.ldm_shape)
        if self.kind == "concat":
            return torch.cat(list(tensors), dim=0)
        if self.kind == "transpose":
            return tensors[0].T.contiguous()
        return tensors[0]


def _weight_bias(diffusers: str, ldm: str, weight_shape: Shape, bias: bool = True) -> list[TensorMap]:
    maps = [TensorMap(f"{ldm}.weight", (f"{diffusers}.weight",), weight_shape)]
    if bias:
        maps.append(TensorMap(f"{ldm}.bias", (f"{diffusers}.bias",), (weight_shape[0],)))
    return maps


def _norm(diffusers: str, ldm: str, channels: int) -> list[TensorMap]:
    return _weight_bias(diffusers, ldm, (channels,))


def _conv(diffusers: str, ldm: str, c_out: int, c_in: int, kernel: int) -> list[TensorMap]:
    return _weight_bias(diffusers, ldm, (c_out, c_in, kernel, kernel))


def _linear(diffusers: str, ldm: str, c_out: int, c_in: int, bias: bool = True) -> list[TensorMap]:
    return _weight_bias(diffusers, ldm, (c_out, c_in), bias)


def _require(config: Mapping[str, Any], name: str, component: str) -> Any:
    if name not in config:
        raise ValueError(f"{component} config lacks {name!r}")
    return config[name]


# ---------------------------------------------------------------------------------------------- UNet

_UNET_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has attention
_UNET_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _unet_resnet(d: str, ldm: str, c_in: int, c_out: int, temb: int) -> list[TensorMap]:
    maps = [
        *_norm(f"{d}.norm1", f"{ldm}.in_layers.0", c_in),
        *_conv(f"{d}.conv1", f"{ldm}.in_layers.2", c_out, c_in, 3),
        *_linear(f"{d}.time_emb_proj", f"{ldm}.emb_layers.1", c_out, temb),
        *_norm(f"{d}.norm2", f"{ldm}.out_layers.0", c_out),
        *_conv(f"{d}.conv2", f"{ldm}.out_layers.3", c_out, c_out, 3),
    ]
    if c_in != c_out:
        maps += _conv(f"{d}.conv_shortcut", f"{ldm}.skip_connection", c_out, c_in, 1)
    return maps


def _unet_transformer(
    d: str, ldm: str, channels: int, heads: int, cross_dim: int, depth: int, linear_proj: bool
) -> list[TensorMap]:
    """A `Transformer2DModel` (ldm `SpatialTransformer`): same names on both sides."""
    inner = (channels // heads) * heads
    ff_inner = inner * 4  # GEGLU feed-forward, mult 4

    def proj(name: str, c_out: int, c_in: int) -> list[TensorMap]:
        if linear_proj:
            return _linear(f"{d}.{name}", f"{ldm}.{name}", c_out, c_in)
        return _conv(f"{d}.{name}", f"{ldm}.{name}", c_out, c_in, 1)

    maps = [*_norm(f"{d}.norm", f"{ldm}.norm", channels), *proj("proj_in", inner, channels)]
    for t in range(depth):
        block = f"transformer_blocks.{t}"
        names = [(f"{d}.{block}.{n}", f"{ldm}.{block}.{n}") for n in ("attn1", "attn2")]
        for (d_attn, l_attn), kv_dim in zip(names, (inner, cross_dim), strict=True):
            maps += _linear(f"{d_attn}.to_q", f"{l_attn}.to_q", inner, inner, bias=False)
            maps += _linear(f"{d_attn}.to_k", f"{l_attn}.to_k", inner, kv_dim, bias=False)
            maps += _linear(f"{d_attn}.to_v", f"{l_attn}.to_v", inner, kv_dim, bias=False)
            maps += _linear(f"{d_attn}.to_out.0", f"{l_attn}.to_out.0", inner, inner)
        for n in ("norm1", "norm2", "norm3"):
            maps += _norm(f"{d}.{block}.{n}", f"{ldm}.{block}.{n}", inner)
        maps += _linear(f"{d}.{block}.ff.net.0.proj", f"{ldm}.{block}.ff.net.0.proj", ff_inner * 2, inner)
        maps += _linear(f"{d}.{block}.ff.net.2", f"{ldm}.{block}.ff.net.2", inner, ff_inner)
    return maps + proj("proj_out", channels, inner)


def unet_tensor_maps(config: Mapping[str, Any], prefix: str = "model.diffusion_model.") -> list[TensorMap]:
    """Every tensor of a `UNet2DConditionModel` (SD 1.x / 2.x / SDXL layout) and its ldm key.

    ldm numbering: `input_blocks.0` is conv_in; then per down block `layers_per_block` entries
    (`.0` resnet, `.1` attention) and, except after the last block, one downsampler (`.0.op`);
    `middle_block.0/1/2` = resnet, attention, resnet; `output_blocks` run over the up blocks with
    `layers_per_block + 1` entries each (`.0` resnet, `.1` attention, then the upsampler `.conv`).
    SDXL's added embedding (diffusers' `add_embedding`) is `label_emb.0.0` / `label_emb.0.2`
    (Linear, SiLU, Linear), and its transformers are `transformer_layers_per_block` deep per level.
    """
    parsed = UNetConfig.from_dict(dict(config))  # what the architecture allows: one set of checks
    channels = list(parsed.block_out_channels)
    if len(set(parsed.layers_per_block)) != 1:
        raise ValueError(
            f"unet config layers_per_block must be one integer, got {config.get('layers_per_block')!r}"
        )
    if len(set(parsed.cross_attention_dim)) != 1:
        raise ValueError(
            f"unet config cross_attention_dim must be one integer, got {config.get('cross_attention_dim')!r}"
        )
    if parsed.time_cond_proj_dim is not None:
        raise ValueError(
            "unet config time_cond_proj_dim (an LCM-distilled UNet) is not supported in single files"
        )
    layers, cross_dim = parsed.layers_per_block[0], parsed.cross_attention_dim[0]
    down_types, up_types = list(parsed.down_block_types), list(parsed.up_block_types)
    n = len(channels)
    heads, depths = list(parsed.num_attention_heads), list(parsed.transformer_layers_per_block)
    linear_proj = parsed.use_linear_projection
    temb = channels[0] * 4

    in_ch, out_ch = parsed.in_channels, parsed.out_channels
    maps = [
        *_conv("conv_in", "input_blocks.0.0", channels[0], in_ch, 3),
        *_linear("time_embedding.linear_1", "time_embed.0", temb, channels[0]),
        *_linear("time_embedding.linear_2", "time_embed.2", temb, temb),
    ]
    if parsed.addition_embed_type == "text_time":
        assert parsed.projection_class_embeddings_input_dim is not None
        maps += _linear(
            "add_embedding.linear_1", "label_emb.0.0", temb, parsed.projection_class_embeddings_input_dim
        )
        maps += _linear("add_embedding.linear_2", "label_emb.0.2", temb, temb)
    ldm_index, c_prev = 1, channels[0]
    for i, (c, block_type) in enumerate(zip(channels, down_types, strict=True)):
        for j in range(layers):
            d, ldm = f"down_blocks.{i}", f"input_blocks.{ldm_index}"
            maps += _unet_resnet(f"{d}.resnets.{j}", f"{ldm}.0", c_prev if j == 0 else c, c, temb)
            if _UNET_DOWN_TYPES[block_type]:
                maps += _unet_transformer(
                    f"{d}.attentions.{j}", f"{ldm}.1", c, heads[i], cross_dim, depths[i], linear_proj
                )
            ldm_index += 1
        if i < n - 1:
            maps += _conv(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{ldm_index}.0.op", c, c, 3)
            ldm_index += 1
        c_prev = c

    c_mid = channels[-1]
    maps += _unet_resnet("mid_block.resnets.0", "middle_block.0", c_mid, c_mid, temb)
    maps += _unet_transformer(
        "mid_block.attentions.0", "middle_block.1", c_mid, heads[-1], cross_dim, depths[-1], linear_proj
    )
    maps += _unet_resnet("mid_block.resnets.1", "middle_block.2", c_mid, c_mid, temb)

    rev_channels, rev_heads, rev_depths = channels[::-1], heads[::-1], depths[::-1]
    c_prev = rev_channels[0]
    for i, (c, block_type) in enumerate(zip(rev_channels, up_types, strict=True)):
        c_skip_last = rev_channels[min(i + 1, n - 1)]  # the block's input channels, seen through the skip
        for j in range(layers + 1):
            d, ldm = f"up_blocks.{i}", f"output_blocks.{i * (layers + 1) + j}"
            c_skip = c_skip_last if j == layers else c
            maps += _unet_resnet(f"{d}.resnets.{j}", f"{ldm}.0", (c_prev if j == 0 else c) + c_skip, c, temb)
            has_attention = _UNET_UP_TYPES[block_type]
            if has_attention:
                maps += _unet_transformer(
                    f"{d}.attentions.{j}", f"{ldm}.1", c, rev_heads[i], cross_dim, rev_depths[i], linear_proj
                )
            if i < n - 1 and j == layers:
                upsampler = f"{ldm}.{2 if has_attention else 1}.conv"
                maps += _conv(f"{d}.upsamplers.0.conv", upsampler, c, c, 3)
        c_prev = c

    maps += _norm("conv_norm_out", "out.0", channels[0])
    maps += _conv("conv_out", "out.2", out_ch, channels[0], 3)
    return _prefixed(maps, prefix)


# ----------------------------------------------------------------------------------------------- VAE


def _vae_resnet(d: str, ldm: str, c_in: int, c_out: int) -> list[TensorMap]:
    maps = [
        *_norm(f"{d}.norm1", f"{ldm}.norm1", c_in),
        *_conv(f"{d}.conv1", f"{ldm}.conv1", c_out, c_in, 3),
        *_norm(f"{d}.norm2", f"{ldm}.norm2", c_out),
        *_conv(f"{d}.conv2", f"{ldm}.conv2", c_out, c_out, 3),
    ]
    if c_in != c_out:
        maps += _conv(f"{d}.conv_shortcut", f"{ldm}.nin_shortcut", c_out, c_in, 1)
    return maps


def _vae_mid_block(d: str, ldm: str, c: int) -> list[TensorMap]:
    """Two resnets around one attention whose q/k/v/proj_out are 1x1 convs in ldm files."""
    maps = _vae_resnet(f"{d}.resnets.0", f"{ldm}.block_1", c, c)
    maps += _norm(f"{d}.attentions.0.group_norm", f"{ldm}.attn_1.norm", c)
    for d_name, l_name in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        d_key, l_key = f"{d}.attentions.0.{d_name}", f"{ldm}.attn_1.{l_name}"
        maps.append(TensorMap(f"{l_key}.weight", (f"{d_key}.weight",), (c, c), kind="conv1x1"))
        maps.append(TensorMap(f"{l_key}.bias", (f"{d_key}.bias",), (c,)))
    return maps + _vae_resnet(f"{d}.resnets.1", f"{ldm}.block_2", c, c)


def vae_tensor_maps(config: Mapping[str, Any], prefix: str = "first_stage_model.") -> list[TensorMap]:
    """Every tensor of an `AutoencoderKL` and its ldm key (ldm numbers decoder `up` blocks in reverse)."""
    parsed = VAEConfig.from_dict(dict(config))  # what the architecture allows: one set of checks
    if not (parsed.use_quant_conv and parsed.use_post_quant_conv and parsed.mid_block_add_attention):
        raise ValueError(
            "vae config without quant convs or mid-block attention is not supported in single files "
            "(SD 1.x / 2.x have them)"
        )
    channels = list(parsed.block_out_channels)
    layers, latent = parsed.layers_per_block, parsed.latent_channels
    n = len(channels)

    maps = _conv("encoder.conv_in", "encoder.conv_in", channels[0], parsed.in_channels, 3)
    c_prev = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers):
            d, ldm = f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}"
            maps += _vae_resnet(d, ldm, c_prev if j == 0 else c, c)
        if i < n - 1:
            maps += _conv(
                f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", c, c, 3
            )
        c_prev = c
    maps += _vae_mid_block("encoder.mid_block", "encoder.mid", channels[-1])
    maps += _norm("encoder.conv_norm_out", "encoder.norm_out", channels[-1])
    maps += _conv("encoder.conv_out", "encoder.conv_out", 2 * latent, channels[-1], 3)
    maps += _conv("quant_conv", "quant_conv", 2 * latent, 2 * latent, 1)
    maps += _conv("post_quant_conv", "post_quant_conv", latent, latent, 1)

    maps += _conv("decoder.conv_in", "decoder.conv_in", channels[-1], latent, 3)
    maps += _vae_mid_block("decoder.mid_block", "decoder.mid", channels[-1])
    rev_channels = channels[::-1]
    c_prev = rev_channels[0]
    for i, c in enumerate(rev_channels):
        ldm_block = n - 1 - i
        for j in range(layers + 1):
            d, ldm = f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_block}.block.{j}"
            maps += _vae_resnet(d, ldm, c_prev if j == 0 else c, c)
        if i < n - 1:
            maps += _conv(
                f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_block}.upsample.conv", c, c, 3
            )
        c_prev = c
    maps += _norm("decoder.conv_norm_out", "decoder.norm_out", channels[0])
    maps += _conv("decoder.conv_out", "decoder.conv_out", parsed.out_channels, channels[0], 3)
    return _prefixed(maps, prefix)


# ------------------------------------------------------------------------------------- text encoders

TEXT_PREFIX = "text_model."  # diffusers-side text encoder keys carry it, as real HF checkpoints do
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: HF CLIPTextModel keys under this prefix
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP text tower
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP ViT-L, HF keys
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP bigG with its projection


def _text_sizes(config: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    names = ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers")
    return tuple(_require(config, name, "text_encoder") for name in names)  # type: ignore[return-value]


def clip_tensor_maps(config: Mapping[str, Any], prefix: str = CLIP_PREFIX) -> list[TensorMap]:
    """SD 1.x (SDXL's first encoder): the file holds HF `CLIPTextModel` keys (with `text_model.`)
    under `cond_stage_model.transformer.` (`conditioner.embedders.0.transformer.`)."""
    vocab, positions, hidden, inner, num_layers = _text_sizes(config)
    t = TEXT_PREFIX
    maps = [
        TensorMap(
            f"{t}embeddings.token_embedding.weight",
            (f"{t}embeddings.token_embedding.weight",),
            (vocab, hidden),
        ),
        TensorMap(
            f"{t}embeddings.position_embedding.weight",
            (f"{t}embeddings.position_embedding.weight",),
            (positions, hidden),
        ),
    ]
    for i in range(num_layers):
        layer = f"{t}encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            maps += _linear(f"{layer}.self_attn.{proj}", f"{layer}.self_attn.{proj}", hidden, hidden)
        maps += _norm(f"{layer}.layer_norm1", f"{layer}.layer_norm1", hidden)
        maps += _linear(f"{layer}.mlp.fc1", f"{layer}.mlp.fc1", inner, hidden)
        maps += _linear(f"{layer}.mlp.fc2", f"{layer}.mlp.fc2", hidden, inner)
        maps += _norm(f"{layer}.layer_norm2", f"{layer}.layer_norm2", hidden)
    maps += _norm(f"{t}final_layer_norm", f"{t}final_layer_norm", hidden)
    return _prefixed(maps, prefix)


def open_clip_tensor_maps(
    config: Mapping[str, Any], prefix: str = OPEN_CLIP_PREFIX, projection: bool = False
) -> list[TensorMap]:
    """SD 2.x: OpenCLIP's text tower; the first `num_hidden_layers` resblocks are the HF layers. With
    `projection` (SDXL's bigG, a `CLIPTextModelWithProjection`), its `text_projection` too."""
    vocab, positions, hidden, inner, num_layers = _text_sizes(config)
    t = TEXT_PREFIX
    maps = [
        TensorMap("token_embedding.weight", (f"{t}embeddings.token_embedding.weight",), (vocab, hidden)),
        TensorMap("positional_embedding", (f"{t}embeddings.position_embedding.weight",), (positions, hidden)),
    ]
    for i in range(num_layers):
        d, ldm = f"{t}encoder.layers.{i}", f"transformer.resblocks.{i}"
        qkv = [f"{d}.self_attn.{p}_proj" for p in ("q", "k", "v")]
        maps += [
            TensorMap(
                f"{ldm}.attn.in_proj_weight", tuple(f"{k}.weight" for k in qkv), (hidden, hidden), "concat"
            ),
            TensorMap(f"{ldm}.attn.in_proj_bias", tuple(f"{k}.bias" for k in qkv), (hidden,), "concat"),
            *_linear(f"{d}.self_attn.out_proj", f"{ldm}.attn.out_proj", hidden, hidden),
            *_norm(f"{d}.layer_norm1", f"{ldm}.ln_1", hidden),
            *_linear(f"{d}.mlp.fc1", f"{ldm}.mlp.c_fc", inner, hidden),
            *_linear(f"{d}.mlp.fc2", f"{ldm}.mlp.c_proj", hidden, inner),
            *_norm(f"{d}.layer_norm2", f"{ldm}.ln_2", hidden),
        ]
    maps += _norm(f"{t}final_layer_norm", "ln_final", hidden)
    if projection:
        projection_dim = _require(config, "projection_dim", "text_encoder_2")
        maps.append(
            TensorMap("text_projection", ("text_projection.weight",), (projection_dim, hidden), "transpose")
        )
    return _prefixed(maps, prefix)


def _prefixed(maps: list[TensorMap], prefix: str) -> list[TensorMap]:
    return [TensorMap(prefix + m.ldm_key, m.diffusers_keys, m.shape, m.kind) for m in maps]
