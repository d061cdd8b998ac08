"""Layers shared by the UNet and the VAE: timestep embedding, resnet, down/upsampling, attention.

Attribute names mirror diffusers' state-dict keys (`norm1`, `conv1`, `time_emb_proj`, `to_q`,
`to_out.0`, `ff.net.0.proj`, ...), so a diffusers checkpoint loads with `strict=True` and no
remapping. Only inference is implemented: there is no dropout. The forwards keep the input's
memory format (contiguous or channels_last), branch only on shapes and dtypes (never on tensor
values), and so are fit for torch.compile and CUDA graphs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# LayerNorm eps inside transformer blocks and GroupNorm eps before `proj_in`: diffusers' fixed
# values, not read from the UNet config
TRANSFORMER_LAYER_NORM_EPS = 1e-5
TRANSFORMER_GROUP_NORM_EPS = 1e-6


def timestep_embedding(
    timesteps: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) float32 of (possibly fractional) timesteps, one per row.

    Frequency i of the `dim // 2` is `max_period ** (-i / (dim // 2 - freq_shift))`, as in DDPM and
    diffusers' `get_timestep_embedding` (same operation order, so the same float32 rounding).
    Output order is [cos, sin] when `flip_sin_to_cos` (SD), else [sin, cos].
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - freq_shift)
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    parts = (
        (torch.cos(angles), torch.sin(angles)) if flip_sin_to_cos else (torch.sin(angles), torch.cos(angles))
    )
    emb = torch.cat(parts, dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) float32 of guidance weights w (LCM-distilled UNets take
    w = guidance_scale - 1), as diffusers' `get_guidance_scale_embedding` (VDM's, same operation
    order): frequency i of the `dim // 2` is 10000 ** (-i / (dim // 2 - 1)) applied to 1000 w,
    output [sin, cos]."""
    w = w.float() * 1000.0
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    angles = w[:, None] * frequencies[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP from the sinusoidal timestep embedding to the embedding every resnet receives. With
    `cond_proj_dim` (LCM-distilled UNets) a condition (the guidance embedding) is projected, without
    bias, and added to the timestep embedding first."""

    def __init__(self, in_channels: int, time_embed_dim: int, cond_proj_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = (
            nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        )
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, t_emb: Tensor, condition: Tensor | None = None) -> Tensor:
        # t_emb (B, in_channels), condition (B, cond_proj_dim) -> (B, time_embed_dim)
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError(
                    "this UNet takes no timestep condition (its config has no time_cond_proj_dim)"
                )
            t_emb = t_emb + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(t_emb)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the (optionally 1x1-projected) input; output scale 1.

    `temb` given to forward must already be SiLU-activated (diffusers applies that SiLU inside
    every resnet; the UNet does it once for all of them). `temb_channels=None` (VAE): no time input.
    """

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        # in-place ops only on tensors created here: fewer full-size allocations and passes
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        if self.time_emb_proj is not None:
            h += self.time_emb_proj(temb)[:, :, None, None]  # (B, Cout, 1, 1) broadcast over pixels
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=0` pads right/bottom by one first (the VAE encoder's asymmetric
    padding, from the original CompVis code); the UNet uses `padding=1`."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv.

    `size` (the skip connection's (H, W) in the UNet) makes odd latent sizes work: 5 -> 9 instead
    of 10, exactly as diffusers' `upsample_size`. Without it, the size doubles.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        # (B, C, H, W) -> (B, C, *size) or (B, C, 2H, 2W)
        # nearest-upsample kernels have failed on large batches / outputs over 2**31 elements with
        # non-contiguous inputs (diffusers issue 984, pytorch issue 141831); the copy is rarely needed
        # (torch.compile generates its own kernel: no copy, and no guard on the batch size, which
        # would split a dynamic-batch compile in two)
        if not torch.compiler.is_compiling() and (x.shape[0] >= 64 or x.numel() * 2 > 2**31):
            x = x.contiguous()
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def multihead_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None, upcast: bool = False
) -> Tensor:
    """Scaled dot-product attention over `heads` heads: (B, Lq, H*D), (B, Lk, H*D) x2 -> (B, Lq, H*D).

    `mask` is a bool key mask broadcastable to (B, H, Lq, Lk), True = attend. With `upcast` and
    float16 inputs the attention runs in float32 (SD 2.x overflows float16 there); otherwise it
    runs in the input dtype.
    """
    b, lq, inner = q.shape
    d = inner // heads
    q = q.reshape(b, lq, heads, d).transpose(1, 2)  # (B, H, Lq, D), a view
    k = k.reshape(b, -1, heads, d).transpose(1, 2)  # (B, H, Lk, D)
    v = v.reshape(b, -1, heads, d).transpose(1, 2)  # (B, H, Lk, D)
    if upcast and q.dtype == torch.float16:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, D)
    return out.transpose(1, 2).reshape(b, lq, inner)  # (B, Lq, H*D)


def fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the given Linears' outputs side by side, for a shared input: one
    matmul reads the input once instead of once per projection."""
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(
        first.in_features,
        sum(linear.out_features for linear in linears),
        bias=has_bias,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([linear.weight for linear in linears]))
        if has_bias:
            fused.bias.copy_(torch.cat([linear.bias for linear in linears]))
    # a frozen model in eval mode stays so
    return fused.requires_grad_(first.weight.requires_grad).train(first.training)


def split_linear(fused: nn.Linear, parts: int) -> list[nn.Linear]:
    """The inverse of `fused_linear` for `parts` equal outputs."""
    out_features = fused.out_features // parts
    weights = fused.weight.detach().chunk(parts)
    biases = fused.bias.detach().chunk(parts) if fused.bias is not None else [None] * parts
    linears = []
    for weight, bias in zip(weights, biases, strict=True):
        linear = nn.Linear(
            fused.in_features,
            out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        linears.append(linear.requires_grad_(fused.weight.requires_grad).train(fused.training))
    return linears


class QKVProjections(nn.Module):
    """The q/k/v projections of an attention (diffusers' keys `to_q`, `to_k`, `to_v`).

    `fuse_projections()` replaces them by one matmul (`to_qkv`; cross-attention: `to_q` and
    `to_kv`, whose input is the text): same outputs, no longer diffusers' state-dict keys, so it is
    for a loaded model about to run (models/accel.py); `unfuse_projections()` gives the keys back.
    """

    def _init_projections(self, dim: int, kv_dim: int, bias: bool, is_cross: bool) -> None:
        # called by the subclass's __init__ where diffusers registers them (the state dict's order)
        self.is_cross = is_cross
        self.to_q: nn.Linear | None = nn.Linear(dim, dim, bias=bias)
        self.to_k: nn.Linear | None = nn.Linear(kv_dim, dim, bias=bias)
        self.to_v: nn.Linear | None = nn.Linear(kv_dim, dim, bias=bias)
        self.to_qkv: nn.Linear | None = None
        self.to_kv: nn.Linear | None = None

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q from `x`; k and v from `context` (None: self-attention, from `x`)."""
        if self.to_qkv is not None:
            if context is not None:
                raise ValueError("a fused self-attention takes no context")
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # views of one (B, L, 3C) output
            return q, k, v
        context = x if context is None else context
        if self.to_kv is not None:
            k, v = self.to_kv(context).chunk(2, dim=-1)
        else:
            k, v = self.to_k(context), self.to_v(context)
        return self.to_q(x), k, v

    def fuse_projections(self) -> None:
        """One matmul for q, k and v (self-attention) or for k and v (cross-attention); idempotent."""
        if self.to_k is None:
            return
        if self.is_cross:
            self.to_kv = fused_linear(self.to_k, self.to_v)
        else:
            self.to_qkv = fused_linear(self.to_q, self.to_k, self.to_v)
            self.to_q = None
        self.to_k = self.to_v = None

    def unfuse_projections(self) -> None:
        """Back to to_q/to_k/to_v (diffusers' state-dict keys), the fused weights split; idempotent."""
        if self.to_qkv is not None:
            self.to_q, self.to_k, self.to_v = split_linear(self.to_qkv, 3)
            self.to_qkv = None
        if self.to_kv is not None:
            self.to_k, self.to_v = split_linear(self.to_kv, 2)
            self.to_kv = None


class Attention(QKVProjections):
    """Multi-head self-attention (`context_dim=None`) or cross-attention; q/k/v without bias,
    fusable (QKVProjections)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        kv_dim = dim if context_dim is None else context_dim
        self._init_projections(dim, kv_dim, bias=False, is_cross=context_dim is not None)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a Dropout

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        # x (B, L, C); context (B, Lc, Cc) or None for self-attention; mask bool (B, 1, 1, Lc)
        q, k, v = self.project(x, context)
        return self.to_out[0](multihead_attention(q, k, v, self.heads, mask, self.upcast))  # (B, L, C)


class GEGLU(nn.Module):
    """Gated GELU: one matmul to 2*dim_out, split in value and gate, value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:  # (..., dim_in) -> (..., dim_out)
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)  # gelu's fresh output takes the product: one less allocation


class FeedForward(nn.Module):
    """GEGLU MLP with 4x inner width; `net.0` and `net.2` as in diffusers (`net.1` is its Dropout)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:  # (B, L, C) -> (B, L, C)
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text, GEGLU feed-forward; residual each."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:  # x (B, L, C)
        # residual adds in place into each sub-layer's fresh output
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context, mask).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, transformer blocks over the H*W pixels as tokens,
    project out, add the input. Projections are 1x1 convs (SD 1.x) or linears (SD 2.x)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        num_layers: int,
        groups: int,
        use_linear_projection: bool,
        upcast: bool,
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        # registration order as diffusers' (proj_in, blocks, proj_out): same state-dict key order
        self.proj_in = (
            nn.Linear(channels, channels) if use_linear_projection else nn.Conv2d(channels, channels, 1)
        )
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim, upcast) for _ in range(num_layers)]
        )
        self.proj_out = (
            nn.Linear(channels, channels) if use_linear_projection else nn.Conv2d(channels, channels, 1)
        )

    @staticmethod
    def _project(layer: nn.Linear | nn.Conv2d, tokens: Tensor) -> Tensor:
        # a 1x1 conv is a linear map of each pixel's channels: apply it to the (B, H*W, C) tokens
        # as one matmul (faster on CPU than PyTorch's 1x1-conv path; no NCHW round trip); a layer with
        # LoRA adapters (models/lora/layers.py: LoraConv2d) adds its rows' adapters the same way
        project_tokens = getattr(layer, "project_tokens", None)
        if project_tokens is not None:
            return project_tokens(tokens)
        return F.linear(tokens, layer.weight.view(layer.weight.shape[0], -1), layer.bias)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        # x (B, C, H, W); context (B, Lc, Cc); mask bool (B, 1, 1, Lc) or None
        b, c, height, width = x.shape
        # (B, C, H, W) -> (B, H*W, C): a copy for contiguous input, a view for channels_last
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)
        h = self._project(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        h = self._project(self.proj_out, h)
        # back to (B, C, H, W) as a view with channels_last strides: no .contiguous() copy, the
        # residual add reads it as is and writes in x's memory format
        return x + h.view(b, height, width, c).permute(0, 3, 1, 2)
