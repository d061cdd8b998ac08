"""bench/lora_bench.py runs (on the CPU, tiny and small): four cases, the plain one the unit of the
ratios, and LoRA rows costing more than none (the adapters really run)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import lora_bench  # noqa: E402


def test_measures_the_four_cases() -> None:
    unet = lora_bench.build_unet("tiny", torch.device("cpu"), torch.float32)

    def call_for(module: torch.nn.Module):
        return lambda sample, timesteps, context, inputs: module(sample, timesteps, context, None, inputs)

    results = lora_bench.measure(unet, call_for, rows=4, loras=2, rank=8, latent=(4, 8, 8), repeats=2)
    assert [r["case"] for r in results] == ["plain", "pool idle", "lora", "lora+locon"]
    assert results[0]["ratio"] == 1.0
    assert results[3]["ms"] > results[0]["ms"]  # LoCon's convolutions are real work
    assert "| lora |" in lora_bench.table(results, "t")
