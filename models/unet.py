"""The Stable Diffusion denoiser: diffusers' `UNet2DConditionModel` architecture in plain PyTorch.

Module names mirror diffusers' state-dict keys, so `load_state_dict(diffusers_sd, strict=True)`
works without remapping. Each batch row has its own timestep, and an optional key-padding mask
lets rows with text contexts of different lengths share one call.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    timestep_embedding,
)
from models.configs import UNetConfig


def _time_embed_dim(config: UNetConfig) -> int:
    return 4 * config.block_out_channels[0]


def _spatial_transformer(config: UNetConfig, block: int, channels: int) -> Transformer2DModel:
    """The transformer of down block `block` (up blocks and the mid block reuse per-block settings)."""
    return Transformer2DModel(
        channels,
        heads=config.num_attention_heads[block],
        context_dim=config.cross_attention_dim[block],
        num_layers=config.transformer_layers_per_block[block],
        groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_projection,
        upcast=config.upcast_attention,
    )


class DownBlock2D(nn.Module):
    """Resnets, each followed by a spatial transformer in a cross-attention block, then a stride-2
    conv unless it is the last block. Stands for diffusers' CrossAttnDownBlock2D and DownBlock2D
    (the latter has no `attentions`). Returns every resnet/transformer output and the downsampled
    output as skip connections. Submodules are registered in diffusers' order (attentions,
    resnets, downsamplers) so the state-dict keys come in the same order too."""

    def __init__(self, config: UNetConfig, index: int) -> None:
        super().__init__()
        channels = config.block_out_channels
        in_channels, out_channels = channels[max(index - 1, 0)], channels[index]
        self.has_cross_attention = config.down_block_types[index] == "CrossAttnDownBlock2D"
        num_layers = config.layers_per_block[index]
        self.attentions = nn.ModuleList(
            [_spatial_transformer(config, index, out_channels) for _ in range(num_layers)]
            if self.has_cross_attention
            else []
        )
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if j == 0 else out_channels,
                    out_channels,
                    _time_embed_dim(config),
                    config.norm_num_groups,
                    config.norm_eps,
                )
                for j in range(num_layers)
            ]
        )
        is_last = index == len(channels) - 1
        self.downsamplers = None if is_last else nn.ModuleList([Downsample2D(out_channels, padding=1)])

    def forward(
        self, h: Tensor, temb: Tensor, context: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, list[Tensor]]:  # h (B, Cin, H, W) -> (B, Cout, H', W'), skips
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.has_cross_attention:
                h = self.attentions[j](h, context, mask)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """Resnet, spatial transformer, resnet at the lowest resolution."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        channels = config.block_out_channels[-1]
        self.attentions = nn.ModuleList(
            [_spatial_transformer(config, len(config.block_out_channels) - 1, channels)]
        )
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    channels, channels, _time_embed_dim(config), config.norm_num_groups, config.norm_eps
                )
                for _ in range(2)
            ]
        )

    def forward(
        self, h: Tensor, temb: Tensor, context: Tensor, mask: Tensor | None
    ) -> Tensor:  # (B, C, H, W)
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, mask)
        return self.resnets[1](h, temb)


class UpBlock2D(nn.Module):
    """Resnets on [h, skip] concatenated along channels, each followed by a spatial transformer in
    a cross-attention block, then nearest-upsampling + conv unless it is the last block. Stands for
    diffusers' CrossAttnUpBlock2D and UpBlock2D; up block `index` mirrors down block n-1-index."""

    def __init__(self, config: UNetConfig, index: int) -> None:
        super().__init__()
        n = len(config.block_out_channels)
        rev_channels = config.block_out_channels[::-1]
        mirror = n - 1 - index  # the down block whose per-block settings apply
        prev_out = rev_channels[max(index - 1, 0)]
        out_channels = rev_channels[index]
        skip_in = rev_channels[min(index + 1, n - 1)]  # channels of the deepest skip this block eats
        num_layers = config.layers_per_block[mirror] + 1
        self.has_cross_attention = config.up_block_types[index] == "CrossAttnUpBlock2D"
        self.attentions = nn.ModuleList(
            [_spatial_transformer(config, mirror, out_channels) for _ in range(num_layers)]
            if self.has_cross_attention
            else []
        )
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    (prev_out if j == 0 else out_channels)
                    + (skip_in if j == num_layers - 1 else out_channels),
                    out_channels,
                    _time_embed_dim(config),
                    config.norm_num_groups,
                    config.norm_eps,
                )
                for j in range(num_layers)
            ]
        )
        self.upsamplers = None if index == n - 1 else nn.ModuleList([Upsample2D(out_channels)])

    def forward(
        self,
        h: Tensor,
        skips: list[Tensor],
        temb: Tensor,
        context: Tensor,
        mask: Tensor | None,
        upsample_size: tuple[int, int] | None,
    ) -> Tensor:  # h (B, C, H, W), skips: this block's skip tensors, shallowest first -> (B, C', H', W')
        for j, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips[-1 - j]], dim=1)  # (B, C + Cskip, H, W)
            h = resnet(h, temb)
            if self.has_cross_attention:
                h = self.attentions[j](h, context, mask)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


# Per-row inputs a UNet may take beside the text context, by name (each (B, ...)):
#   timestep_cond  (B, time_cond_proj_dim) an LCM-distilled UNet's guidance embedding
#                  (`models.blocks.guidance_embedding`), added to its timestep embedding
ROW_INPUTS = ("timestep_cond",)


class UNet2DConditionModel(nn.Module):
    """Predicts the noise (or v) in a noisy latent, given per-row timesteps and text embeddings."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        n = len(channels)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(
            channels[0], _time_embed_dim(config), config.time_cond_proj_dim
        )
        # registration order as diffusers' (down, up, mid): the same state-dict key order
        self.down_blocks = nn.ModuleList([DownBlock2D(config, i) for i in range(n)])
        self.up_blocks = nn.ModuleList([UpBlock2D(config, i) for i in range(n)])
        self.mid_block = UNetMidBlock2DCrossAttn(config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    def row_inputs_example(self, rows: int, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """Zeros of every per-row input this UNet takes (what a warm-up must pass to prepare the
        same call shapes as real calls)."""
        example = {}
        if self.config.time_cond_proj_dim is not None:
            example["timestep_cond"] = torch.zeros(
                (rows, self.config.time_cond_proj_dim), device=device, dtype=dtype
            )
        return example

    def forward(
        self,
        sample: Tensor,
        timesteps: Tensor,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        conditioning: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Denoiser output (B, out_channels, h, w) for `sample` (B, in_channels, h, w).

        `timesteps`: (B,) float or int, one timestep per row (a 0-d or 1-element tensor is
        broadcast to every row). `encoder_hidden_states`: (B, L, cross_attention_dim).
        `encoder_attention_mask`: optional (B, L) bool, True = attend; a key-padding mask for the
        cross-attention only, so rows whose prompts were padded to a common L give the same output
        as unpadded. A row with no True attends to every token, as diffusers' -10000 bias does.
        Any h, w work: where a size is odd, upsampling targets the skip connection's size.
        `conditioning`: per-row inputs beyond the text, by name (`ROW_INPUTS`), each (B, ...): what
        this UNet's config asks for (`row_inputs_example` says which), nothing else.
        """
        conditioning = dict(conditioning or {})
        unknown = sorted(set(conditioning) - set(ROW_INPUTS))
        if unknown:
            raise ValueError(f"unknown UNet row inputs {unknown}; known: {sorted(ROW_INPUTS)}")
        timestep_cond = conditioning.get("timestep_cond")
        batch = sample.shape[0]
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = timestep_embedding(
            timesteps.to(sample.device).reshape(-1).expand(batch),
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        ).to(sample.dtype)  # (B, C0), computed in float32
        if timestep_cond is not None:
            expected = (batch, self.config.time_cond_proj_dim)
            if self.config.time_cond_proj_dim is None:
                raise ValueError("this UNet takes no timestep_cond: its config has no time_cond_proj_dim")
            if tuple(timestep_cond.shape) != expected:
                raise ValueError(
                    f"timestep_cond has shape {tuple(timestep_cond.shape)}, expected "
                    f"(B, time_cond_proj_dim) = {expected}"
                )
            timestep_cond = timestep_cond.to(device=sample.device, dtype=sample.dtype)
        # every resnet applies SiLU to the embedding before its own projection: do it once here
        temb = F.silu(self.time_embedding(t_emb, timestep_cond))  # (B, 4 * C0)

        mask = None
        if encoder_attention_mask is not None:
            if encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
                raise ValueError(
                    f"encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)}, expected (B, L) = "
                    f"{tuple(encoder_hidden_states.shape[:2])} to match encoder_hidden_states"
                )
            mask = encoder_attention_mask.to(torch.bool)
            mask = mask | ~mask.any(dim=-1, keepdim=True)  # no all-False row (SDPA would give NaN)
            mask = mask[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and query pixels

        h = self.conv_in(sample)  # (B, C0, h, w)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, encoder_hidden_states, mask)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, encoder_hidden_states, mask)
        for block in self.up_blocks:
            n_skips = len(block.resnets)
            block_skips = skips[-n_skips:]
            del skips[-n_skips:]
            # upsample to the next skip's size, not blindly 2x, so odd sizes line up
            upsample_size = tuple(skips[-1].shape[-2:]) if block.upsamplers is not None else None
            h = block(h, block_skips, temb, encoder_hidden_states, mask, upsample_size)
        h = F.silu(self.conv_norm_out(h), inplace=True)
        return self.conv_out(h)
