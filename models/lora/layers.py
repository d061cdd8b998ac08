"""The UNet's Linear and Conv2d layers with batched LoRA adapters from a fixed pool of slots.

Each adapted layer keeps, beside its own weight (the same Parameter: state-dict keys unchanged),
`lora_down` (S, R, in[, kh, kw]) and `lora_up` (S, out, R) for S slots of rank at most R (a smaller
rank is zero-padded; alpha / r is folded into `up`). A call's rows say which slots they use and with
what weight: `slots` (B, K) int64 and `scales` (B, K), K the most LoRAs on one row of the call (a row
with fewer uses slot 0 with weight 0). Each layer adds, for row b,

    sum_k scales[b, k] * up[slots[b, k]] @ down[slots[b, k]] @ x[b]

as two batched matmuls over gathered weights (one (K*R)-rank product per row), never merging
anything into the base weight. Slot indices are values, not shapes: torch.compile and CUDA graphs
see the same graph whatever LoRAs the rows carry.

Layers are in two groups, as kohya trains them: the transformer layers (attention q/k/v/out, the
feed-forward, proj_in/proj_out) read `scales`; the resnet and down/upsampler layers (LoCon's
convolutions and the resnets' time projection) read `conv_scales`, which a call leaves out (None)
when none of its LoRAs adapts them, so plain LoRAs cost nothing there.

The rows are set by the UNet's forward at the start of every call (`LoraRows.set`), on one object
shared by its adapted layers: the adapters live deep in blocks that also serve the VAE, so the row
inputs reach them through this object rather than through every block's signature.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the UNet's row inputs that carry LoRAs (models/unet.py: ROW_INPUTS)
LORA_ROW_INPUTS = ("lora_slots", "lora_scales", "lora_conv_scales")
TRANSFORMER, RESNET = "transformer", "resnet"


class LoraRows:
    """The current UNet call's LoRA rows, read by every adapted layer of one UNet."""

    def __init__(self) -> None:
        self.slots: Tensor | None = None  # (B, K) int64
        self.scales: Tensor | None = None  # (B, K): transformer layers
        self.conv_scales: Tensor | None = None  # (B, K) or None: resnet/sampler layers skipped

    def set(self, conditioning: Mapping[str, Tensor]) -> None:
        """Take this call's rows (every call sets them: absent names mean no LoRA in the call)."""
        self.slots = conditioning.get("lora_slots")
        self.scales = conditioning.get("lora_scales")
        self.conv_scales = conditioning.get("lora_conv_scales")
        if (self.slots is None) != (self.scales is None) or (
            self.conv_scales is not None and self.slots is None
        ):
            raise ValueError("lora_slots and lora_scales go together (lora_conv_scales only with them)")
        if self.slots is not None and self.slots.shape != self.scales.shape:
            raise ValueError(
                f"lora_slots {tuple(self.slots.shape)} and lora_scales {tuple(self.scales.shape)} differ "
                "in shape"
            )

    def for_group(self, group: str) -> tuple[Tensor, Tensor] | None:
        scales = self.scales if group == TRANSFORMER else self.conv_scales
        if scales is None or self.slots is None:
            return None
        return self.slots, scales


def example_rows(rows: int, device: torch.device, dtype: torch.dtype, conv: bool) -> dict[str, Tensor]:
    """LoRA row inputs of `rows` rows with one LoRA each at weight 0 (slot 0): what a warm-up passes
    to prepare the calls that carry LoRAs (with `conv`: LoCon's too) without changing any output."""
    slots = torch.zeros((rows, 1), dtype=torch.long, device=device)
    scales = torch.zeros((rows, 1), dtype=dtype, device=device)
    inputs = {"lora_slots": slots, "lora_scales": scales}
    if conv:
        inputs["lora_conv_scales"] = scales
    return inputs


def _gathered(down: Tensor, up: Tensor, slots: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's adapters side by side: downs (B, K*R, in...) and weighted ups (B, out, K*R)."""
    b, k = slots.shape
    downs = down[slots]  # (B, K, R, in...)
    downs = downs.reshape(b, k * down.shape[1], *down.shape[2:])
    ups = up[slots] * scales.to(up.dtype)[:, :, None, None]  # (B, K, out, R)
    ups = ups.permute(0, 2, 1, 3).reshape(b, up.shape[1], k * up.shape[2])
    return downs, ups


def add_linear_delta(
    out: Tensor, x: Tensor, down: Tensor, up: Tensor, slots: Tensor, scales: Tensor
) -> Tensor:
    """out + each row's weighted sum of its slots' up(down(x)): x (B, ..., in), out (B, ..., out_features),
    down (S, R, in), up (S, out_features, R). The add rides in the second matmul (baddbmm)."""
    b = x.shape[0]
    downs, ups = _gathered(down, up, slots, scales)
    tokens = x.reshape(b, -1, x.shape[-1])  # (B, L, in)
    low = torch.bmm(tokens, downs.transpose(1, 2))  # (B, L, K*R)
    summed = torch.baddbmm(out.reshape(b, -1, out.shape[-1]), low, ups.transpose(1, 2))  # (B, L, out)
    return summed.reshape(out.shape)


class LoraLinear(nn.Linear):
    """An nn.Linear (same weight and bias Parameters) plus pool slots; see the module docstring."""

    group: str
    rows: LoraRows

    @classmethod
    def adapt(cls, base: nn.Linear, rows: LoraRows, group: str, slots: int, rank: int) -> LoraLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = base.in_features, base.out_features
        layer.weight, layer.bias = base.weight, base.bias
        layer.rows, layer.group = rows, group
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        layer.register_buffer(
            "lora_down", torch.zeros((slots, rank, base.in_features), **kw), persistent=False
        )
        layer.register_buffer(
            "lora_up", torch.zeros((slots, base.out_features, rank), **kw), persistent=False
        )
        return layer.train(base.training)

    @property
    def kernel(self) -> tuple[int, ...]:
        return ()

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """The transformer's proj_in/out (models/blocks.py: Transformer2DModel._project; SD 2.x's are
        Linears): the forward, adapters included."""
        return self(tokens)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        rows = self.rows.for_group(self.group)
        if rows is None:
            return out
        return add_linear_delta(out, x, self.lora_down, self.lora_up, *rows)


class LoraConv2d(nn.Conv2d):
    """An nn.Conv2d (same weight and bias Parameters) plus pool slots: `down` is a convolution of the
    base's kernel, stride and padding to R channels, `up` a 1x1 convolution back (LoCon)."""

    group: str
    rows: LoraRows

    @classmethod
    def adapt(cls, base: nn.Conv2d, rows: LoraRows, group: str, slots: int, rank: int) -> LoraConv2d:
        if base.groups != 1:
            raise ValueError("grouped convolutions take no LoRA")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for name in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
            "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice",
        ):  # fmt: skip
            setattr(layer, name, getattr(base, name))
        layer.weight, layer.bias = base.weight, base.bias
        layer.rows, layer.group = rows, group
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        shape = (slots, rank, base.in_channels, *base.kernel_size)
        layer.register_buffer("lora_down", torch.zeros(shape, **kw), persistent=False)
        layer.register_buffer(
            "lora_up", torch.zeros((slots, base.out_channels, rank), **kw), persistent=False
        )
        return layer.train(base.training)

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, out, H', W')
        out = self._conv_forward(x, self.weight, self.bias)
        rows = self.rows.for_group(self.group)
        if rows is None:
            return out
        slots, scales = rows
        downs, ups = _gathered(
            self.lora_down, self.lora_up, slots, scales
        )  # (B, KR, in, kh, kw), (B, out, KR)
        b = x.shape[0]
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), 0):
            low = torch.bmm(downs.flatten(2), x.reshape(b, x.shape[1], -1))  # (B, KR, H*W)
        else:
            # every row its own filters: one grouped convolution over the rows stacked as channels
            low = F.conv2d(
                x.reshape(1, -1, *x.shape[2:]),
                downs.reshape(-1, *downs.shape[2:]),
                None,
                self.stride,
                self.padding,
                self.dilation,
                groups=b,
            ).reshape(b, downs.shape[1], -1)  # (B, KR, H'*W')
        summed = torch.baddbmm(out.reshape(b, out.shape[1], -1), ups, low)  # (B, out, H'*W')
        return summed.view(out.shape)

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """A 1x1 convolution applied to (B, L, in) tokens as a matmul (the transformer's proj_in/out,
        models/blocks.py: Transformer2DModel._project), adapters included."""
        out = F.linear(tokens, self.weight.view(self.weight.shape[0], -1), self.bias)
        rows = self.rows.for_group(self.group)
        if rows is None:
            return out
        return add_linear_delta(out, tokens, self.lora_down.flatten(2), self.lora_up, *rows)
