"""The batched adapters: each row gets its own slots' weighted up(down(x)), exactly as a per-row
loop computes it; slots are reused only when no running image holds their LoRA."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from models.lora.files import Adapter, LoraFileError
from models.lora.layers import RESNET, TRANSFORMER, LoraConv2d, LoraLinear, LoraRows
from models.lora.pool import LoraPool, LoraSlotsBusy
from models.unet import UNet2DConditionModel

torch.manual_seed(0)


def reference(
    base: nn.Module, x: torch.Tensor, adapters: list[list[tuple[torch.Tensor, torch.Tensor, float]]]
) -> torch.Tensor:
    """Row by row: base(x) + sum of weight * up(down(x)), down as the base's own conv/linear."""
    rows = []
    for b, row_adapters in enumerate(adapters):
        out = base(x[b : b + 1])
        for down, up, weight in row_adapters:
            if isinstance(base, nn.Conv2d):
                low = nn.functional.conv2d(x[b : b + 1], down, None, base.stride, base.padding)
                out = out + weight * nn.functional.conv2d(low, up[:, :, None, None])
            else:
                out = out + weight * (x[b : b + 1] @ down.T @ up.T)
        rows.append(out)
    return torch.cat(rows)


@pytest.mark.parametrize(
    "base",
    [nn.Linear(12, 10), nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.Conv2d(6, 5, 1)],
    ids=["linear", "conv 3x3 stride 2", "conv 1x1"],
)
def test_each_row_gets_its_own_slots(base: nn.Module) -> None:
    rows = LoraRows()
    group = TRANSFORMER if isinstance(base, nn.Linear) else RESNET
    cls = LoraLinear if isinstance(base, nn.Linear) else LoraConv2d
    layer = cls.adapt(base, rows, group, slots=3, rank=4)
    ranks = (4, 2, 3)
    kernel = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()
    in_dim = base.in_features if isinstance(base, nn.Linear) else base.in_channels
    out_dim = base.out_features if isinstance(base, nn.Linear) else base.out_channels
    weights = [(torch.randn(r, in_dim, *kernel), torch.randn(out_dim, r)) for r in ranks]
    with torch.no_grad():
        for slot, (down, up) in enumerate(weights):
            layer.lora_down[slot, : down.shape[0]] = down
            layer.lora_up[slot, :, : up.shape[1]] = up
    x = torch.randn(4, 7, in_dim) if isinstance(base, nn.Linear) else torch.randn(4, in_dim, 9, 7)
    slots = torch.tensor([[0, 2], [1, 0], [2, 0], [0, 0]])
    scales = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # row 3: no LoRA
    rows.set({"lora_slots": slots, "lora_scales": scales, "lora_conv_scales": scales})
    expected = reference(
        base,
        x,
        [
            [(*weights[int(s)], float(w)) for s, w in zip(ss, ws, strict=True) if w]
            for ss, ws in zip(slots, scales, strict=True)
        ],
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    rows.set({})  # a call without LoRAs: the base layer alone
    torch.testing.assert_close(layer(x), base(x))


def test_slots_are_reused_only_when_no_running_image_holds_them() -> None:
    from models.configs import UNetConfig
    from models.tiny_configs import tiny_config

    unet = UNet2DConditionModel(UNetConfig.from_dict(tiny_config("sd1")["unet"]))
    pool = LoraPool(unet, slots=2, max_rank=4)
    module, layer = next(iter(pool.layers.items()))
    shape_in = layer.lora_down.shape[2:]

    def lora(value: float) -> dict[str, Adapter]:
        return {
            module: Adapter(torch.full((2, *shape_in), value), torch.ones(layer.lora_up.shape[1], 2), 1.0)
        }

    a, b = pool.lease("a", lora(1.0)), pool.lease("b", lora(2.0))
    assert {a.slot, b.slot} == {0, 1}
    assert pool.fits([["a"], ["c"]]) == [True, False]
    with pytest.raises(LoraSlotsBusy):
        pool.lease("c", lora(3.0))
    del a
    gc.collect()
    c = pool.lease("c", lora(3.0))  # a's slot: the only one no image holds
    assert pool.loaded() == ["b", "c"] and layer.lora_down[c.slot, 0].flatten()[0] == 3.0
    with pytest.raises(LoraFileError, match="rank 8, more than the pool's SD_LORA_MAX_RANK 4"):
        pool.check(
            "big", {module: Adapter(torch.ones(8, *shape_in), torch.ones(layer.lora_up.shape[1], 8), 1.0)}
        )


def test_bucketed_runner_pads_lora_rows_and_takes_any_mix() -> None:
    """Through the CUDA-graph buckets' path (eager on the CPU): LoRA rows padded to a bucket, calls of
    K = 1 and K = 2 and without LoRAs after one another, each equal to the UNet called directly."""
    from models.accel import AccelConfig, UNetRunner
    from models.configs import UNetConfig
    from models.tiny_configs import tiny_config

    unet = UNet2DConditionModel(UNetConfig.from_dict(tiny_config("sd1")["unet"])).eval()
    pool = LoraPool(unet, slots=3, max_rank=4)
    with torch.no_grad():
        for layer in pool.layers.values():
            layer.lora_down.normal_(std=0.3)
            layer.lora_up.normal_(std=0.3)
    runner = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=(2, 4)))
    sample, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 900.0])
    context = torch.randn(3, 77, unet.config.cross_attention_dim[0])
    calls = [
        {"lora_slots": torch.tensor([[1], [0], [2]]), "lora_scales": torch.tensor([[1.0], [0.0], [-0.5]])},
        {
            "lora_slots": torch.tensor([[1, 2], [0, 0], [2, 1]]),
            "lora_scales": torch.tensor([[1.0, 0.5], [0.0, 0.0], [-0.5, 2.0]]),
        },
        {},
    ]
    calls[1]["lora_conv_scales"] = calls[1]["lora_scales"]
    with torch.no_grad():
        outputs = []
        for inputs in calls:
            expected = unet(sample, t, context, None, inputs)
            # padded to the bucket's batch size: CPU kernels round differently per batch size
            # (2.4e-5 seen on an AVX2 machine)
            got = runner(sample, t, context, None, inputs or None)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            outputs.append(expected)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-2  # the LoRAs change the rows they are on
    torch.testing.assert_close(outputs[0][1], outputs[2][1], rtol=1e-4, atol=1e-4)  # ... and only those
