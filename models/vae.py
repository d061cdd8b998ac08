"""The Stable Diffusion KL autoencoder: diffusers' `AutoencoderKL` architecture in plain PyTorch.

Images (B, 3, H, W) in [-1, 1] <-> latents (B, 4, H/8, W/8). Module names mirror diffusers'
state-dict keys; `convert_deprecated_vae_attention_keys` renames the mid-block attention keys of
older diffusers folders (`query`/`key`/`value`/`proj_attn`) to the current ones.
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import Downsample2D, QKVProjections, ResnetBlock2D, Upsample2D, multihead_attention
from models.configs import VAEConfig

VAE_RESNET_EPS = 1e-6  # diffusers' fixed eps for every VAE GroupNorm
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # clamp of the posterior's log-variance, as diffusers


class VAEAttention(QKVProjections):
    """Single-head self-attention over all pixels with GroupNorm in front and the input added
    back (diffusers' `Attention(..., residual_connection=True, rescale_output_factor=1)`); q/k/v
    with bias, fusable (QKVProjections)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=VAE_RESNET_EPS)
        self._init_projections(channels, channels, bias=True, is_cross=False)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' to_out.1 is a Dropout

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, c, height, width = x.shape
        h = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)  # (B, H*W, C)
        h = multihead_attention(*self.project(h), heads=1)
        h = self.to_out[0](h).view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, H, W) view
        return x + h


class UNetMidBlock2D(nn.Module):
    """Resnet, (optional) self-attention, resnet at the latent resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, None, groups, VAE_RESNET_EPS) for _ in range(2)]
        )

    def forward(self, h: Tensor) -> Tensor:  # (B, C, H, W)
        h = self.resnets[0](h)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h)


class DownEncoderBlock2D(nn.Module):
    """Resnets, then (unless last) a stride-2 conv with the encoder's asymmetric (0, 1, 0, 1) pad."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if j == 0 else out_channels, out_channels, None, groups, VAE_RESNET_EPS
                )
                for j in range(num_layers)
            ]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, h: Tensor) -> Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
        return h


class UpDecoderBlock2D(nn.Module):
    """Resnets, then (unless last) nearest 2x upsampling and a conv."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if j == 0 else out_channels, out_channels, None, groups, VAE_RESNET_EPS
                )
                for j in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, h: Tensor) -> Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> mean and log-variance stacked (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock2D(
                    channels[max(i - 1, 0)],
                    channels[i],
                    config.layers_per_block,
                    groups,
                    add_downsample=i < len(channels) - 1,
                )
                for i in range(len(channels))
            ]
        )
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=VAE_RESNET_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        rev_channels = config.block_out_channels[::-1]
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, rev_channels[0], kernel_size=3, padding=1)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock2D(
                    rev_channels[max(i - 1, 0)],
                    rev_channels[i],
                    config.layers_per_block + 1,
                    groups,
                    add_upsample=i < len(rev_channels) - 1,
                )
                for i in range(len(rev_channels))
            ]
        )
        self.mid_block = UNetMidBlock2D(rev_channels[0], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, rev_channels[-1], eps=VAE_RESNET_EPS)
        self.conv_out = nn.Conv2d(rev_channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder. `encode` gives the diagonal Gaussian posterior's parameters,
    `decode` maps an UNSCALED latent back to an image; the pipeline multiplies latents by
    `config.scaling_factor` after encoding and divides by it before decoding."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(latent, latent, kernel_size=1) if config.use_post_quant_conv else None
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image (B, C, H, W) in [-1, 1] -> (mean, logvar), each (B, latent_channels, H/f, W/f).

        logvar is clamped to [-30, 20] as diffusers does; the posterior's mode is `mean`, a sample is
        `mean + exp(0.5 * logvar) * noise`.
        """
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f), about [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


_DEPRECATED_ATTENTION_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:encoder|decoder)\.mid_block\.attentions\.0\.)(?P<name>query|key|value|proj_attn)\."
    r"(?P<param>weight|bias)$"
)
_NEW_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_deprecated_vae_attention_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename old diffusers VAE mid-block attention keys to the current names, as diffusers does
    when it loads them: `*.mid_block.attentions.0.{query,key,value,proj_attn}.{weight,bias}` ->
    `to_q`, `to_k`, `to_v`, `to_out.0`. Other keys (and already-new ones) pass through unchanged;
    returns a new dict. Older folders such as CompVis/stable-diffusion-v1-4's `vae/` still use the
    old names."""
    converted = {}
    for key, value in state_dict.items():
        match = _DEPRECATED_ATTENTION_KEY.match(key)
        if match:
            key = f"{match['prefix']}{_NEW_ATTENTION_NAMES[match['name']]}.{match['param']}"
        converted[key] = value
    return converted
