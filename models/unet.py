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
from models.configs import TIME_IDS, UNetConfig
from models.lora.layers import LoraRows


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
#   text_embeds    (B, text_embeds_dim) SDXL's pooled text embedding (1280 wide)
#   time_ids       (B, 6) SDXL's size/crop numbers: original (height, width), crop (top, left),
#                  target (height, width), in pixels; with text_embeds through `add_embedding`
#   image_cond     (B, in_channels - out_channels, h, w) an inpainting UNet's image conditioning (SD
#                  1.5/2 inpainting: 9 = 4 + 5 input channels: the mask (1) and the masked image's
#                  latent (4), models/img2img.py), concatenated after the sample's channels
#   lora_slots     (B, K) int64 the LoRA pool slots each row uses (models/lora/layers.py), K the most
#                  LoRAs on one row of the call; a row with fewer pads with slot 0 at weight 0
#   lora_scales    (B, K) their weights in the transformer layers (attention, feed-forward, proj_in/out)
#   lora_conv_scales (B, K) their weights in the resnets and down/upsamplers (LoCon); absent: skipped
ROW_INPUTS = (
    "timestep_cond",
    "text_embeds",
    "time_ids",
    "image_cond",
    "lora_slots",
    "lora_scales",
    "lora_conv_scales",
)


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
        # SDXL ("text_time"): [pooled text, embedded size/crop numbers] -> added to the time embedding
        self.add_embedding = (
            TimestepEmbedding(config.projection_class_embeddings_input_dim, _time_embed_dim(config))
            if config.addition_embed_type == "text_time"
            else None
        )
        # registration order as diffusers' (down, up, mid): the same state-dict key order
        self.down_blocks = nn.ModuleList([DownBlock2D(config, i) for i in range(n)])
        self.up_blocks = nn.ModuleList([UpBlock2D(config, i) for i in range(n)])
        self.mid_block = UNetMidBlock2DCrossAttn(config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)
        # set by models/lora/pool.py: the rows every adapted layer reads, set at the start of each call
        self.lora_rows: LoraRows | None = None

    @property
    def image_cond_channels(self) -> int:
        """Input channels beyond the latent's: an inpainting UNet's image conditioning (0: none)."""
        return self.config.in_channels - self.config.out_channels

    def row_inputs_example(
        self, rows: int, device: torch.device, dtype: torch.dtype, latent_size: tuple[int, int] | None = None
    ) -> dict[str, Tensor]:
        """Zeros of every per-row input this UNet takes (what a warm-up must pass to prepare the
        same call shapes as real calls); an inpainting UNet's `image_cond` needs the latent's (h, w)."""
        example = {}
        if self.image_cond_channels > 0:
            if latent_size is None:
                raise ValueError("an inpainting UNet's example inputs need the latent size (h, w)")
            example["image_cond"] = torch.zeros(
                (rows, self.image_cond_channels, *latent_size), device=device, dtype=dtype
            )
        if self.config.time_cond_proj_dim is not None:
            example["timestep_cond"] = torch.zeros(
                (rows, self.config.time_cond_proj_dim), device=device, dtype=dtype
            )
        if self.add_embedding is not None:
            example["text_embeds"] = torch.zeros(
                (rows, self.config.text_embeds_dim), device=device, dtype=dtype
            )
            example["time_ids"] = torch.zeros((rows, TIME_IDS), device=device, dtype=dtype)
        return example

    def added_embedding(self, conditioning: Mapping[str, Tensor], batch: int, dtype: torch.dtype) -> Tensor:
        """SDXL's added conditioning (B, 4 * C0), as diffusers' `get_aug_embed` for "text_time": each
        of the six size/crop numbers through the sinusoidal embedding (float32), concatenated after
        the pooled text embedding, through `add_embedding`."""
        text_embeds, time_ids = conditioning.get("text_embeds"), conditioning.get("time_ids")
        if text_embeds is None or time_ids is None:
            raise ValueError(
                "this UNet (addition_embed_type text_time, SDXL) needs the row inputs text_embeds and "
                "time_ids"
            )
        for name, value, width in (
            ("text_embeds", text_embeds, self.config.text_embeds_dim),
            ("time_ids", time_ids, TIME_IDS),
        ):
            if tuple(value.shape) != (batch, width):
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}, expected (B, {width}) = {(batch, width)}"
                )
        dim = self.config.addition_time_embed_dim
        assert dim is not None and self.add_embedding is not None
        device = self.add_embedding.linear_1.weight.device
        time_embeds = timestep_embedding(
            time_ids.to(device).reshape(-1), dim, self.config.flip_sin_to_cos, self.config.freq_shift
        ).reshape(batch, TIME_IDS * dim)  # (B, 6 * dim) float32
        add_embeds = torch.cat([text_embeds.to(device=device, dtype=torch.float32), time_embeds], dim=-1)
        return self.add_embedding(add_embeds.to(dtype))  # (B, 4 * C0)

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
        if self.add_embedding is None and ({"text_embeds", "time_ids"} & set(conditioning)):
            raise ValueError(
                "this UNet takes no text_embeds or time_ids: its config has no addition_embed_type"
            )
        if self.lora_rows is not None:
            self.lora_rows.set(conditioning)  # every call: a call without LoRAs clears the last one's
        elif any(name.startswith("lora_") for name in conditioning):
            raise ValueError(
                "this UNet has no LoRA pool (models/lora/pool.py) and takes no lora_* row inputs"
            )
        timestep_cond = conditioning.get("timestep_cond")
        batch = sample.shape[0]
        image_cond = conditioning.get("image_cond")
        if image_cond is not None:
            # diffusers' inpainting pipeline: [latent, mask, masked-image latent] on channels
            sample = torch.cat([sample, image_cond.to(device=sample.device, dtype=sample.dtype)], dim=1)
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"this UNet takes {self.config.in_channels} input channels, got {sample.shape[1]}"
                + (" (an inpainting UNet: the latent and its image_cond)" if self.image_cond_channels else "")
            )
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
        emb = self.time_embedding(t_emb, timestep_cond)  # (B, 4 * C0)
        if self.add_embedding is not None:
            emb = emb + self.added_embedding(conditioning, batch, emb.dtype)
        # every resnet applies SiLU to the embedding before its own projection: do it once here
        temb = F.silu(emb)

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
