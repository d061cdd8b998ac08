"""bench/gpu.py on the CPU (--quick: tiny config, the same code paths as on a GPU), its figures
(images/s, MFU against the card's peak) and bench/gpu_run.sh's syntax."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench")]

import gpu  # noqa: E402
import gpu_runs  # noqa: E402
from gpu_report import markdown  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_mode_runs_every_stage_and_writes_its_results(tmp_path: Path) -> None:
    argv = ["--quick", "--steps", "2", "--batches", "1", "--ablation-batch", "1", "--engine-requests", "2"]
    argv += ["--engine-compile", "--profile"]  # the compiled pass (eager backend on the CPU), a profile
    assert gpu.main([*argv, "--skip", "worker", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    statuses = {name: stage["status"] for name, stage in results["stages"].items()}
    assert statuses.pop("worker") == "skipped (--skip)"
    assert set(statuses.values()) == {"ok"}, statuses
    assert [row["batch"] for row in results["ours"]] == [1] and results["ours"][0]["images_per_s"] > 0
    assert [row["batch"] for row in results["diffusers"]] == [1]
    rows = results["precision"]["rows"]
    assert rows["float16 eager"]["pass"] and rows["float16 fast path"]["pass"]
    assert rows["bfloat16 eager"]["pass"] is None  # reported, no bar
    plain, compiled = results["engine"]
    # the compiled pass takes the fastest compiled ablation
    fastest = max((r for r in results["ablations"] if r["compiled"]), key=lambda r: r["images_per_s"])
    assert (
        plain["requests"] == compiled["requests"] == 2 and compiled["label"] == f"engine, {fastest['name']}"
    )
    assert plain["control"]["images_per_s"] > 0 and plain["unet_calls"]["calls"] == 2  # engine vs direct
    assert len(plain["warm_up_loads_s"]) == 2
    assert plain["images_per_s"] > 0 and compiled["images_per_s"] > 0
    # the engine's own per-step lines were seen: every timed step, after the first one ended
    assert plain["phases"]["steps_logged"] == 2 and 0 < plain["phases"]["first_step_end_s"] < plain["span_s"]
    names = [row["name"] for row in results["ablations"]]
    assert names[:4] == [
        "fast path (default)",
        "+ q/k/v projections fused",
        "+ 1x1 convolutions as matmuls (inductor)",
        "+ Triton matmul autotuning (inductor)",
    ]
    assert names[4:8] == [
        "default, VAE float32",
        "default, VAE contiguous",
        "default + VAE decoder compiled",
        "CUDA graphs only (SD_COMPILE=off)",
    ]
    assert "- CUDA graphs" in names and len(names) == 16
    # the decode alone: float16 pixels within a level of float32's (any layout, compiled or not), the
    # fallback takes over an overflow
    vae_rows = results["vae"]["rows"]
    assert [(r["vae_dtype"], r["layout"]) for r in vae_rows] == [
        ("float32", "channels_last"),
        ("float16", "channels_last"),
        ("float16, other layout", "contiguous"),
        ("float16, decoder compiled", "channels_last"),
    ]
    assert vae_rows[0]["max_level_diff"] == 0
    assert all(r["max_level_diff"] <= 1 and r["s"] > 0 for r in vae_rows)
    assert results["vae"]["fallback"] == {
        "latents": 2,
        "float16_decodes_overflowed": 2,
        "fallback_max_level_diff_vs_float32": 0,
    }
    assert "| float16 | channels_last | 1 | 8 |" in (tmp_path / "gpu_bench.md").read_text()
    for row in results["ablations"]:  # outputs kept (bfloat16 has 3 fewer mantissa bits)
        assert row["vs_default_relative_error"] < (5e-2 if "bfloat16" in row["name"] else 1e-3), row["name"]
    assert results["flops"]["source"] == "counted" and results["flops"]["unet_cfg_step_flop"] > 0
    report = (tmp_path / "gpu_bench.md").read_text()
    assert "| batch | ours img/s | diffusers img/s" in report and "| ablation (batch 1)" in report
    # each ablation against diffusers at the same batch, same run
    default_row = next(line for line in report.splitlines() if line.startswith("| fast path (default) |"))
    vs_default, vs_diffusers = default_row.split("|")[4:6]
    ratio = results["ablations"][0]["images_per_s"] / results["diffusers"][0]["images_per_s"]
    assert vs_default.strip() == "1.00x" and vs_diffusers.strip() == f"{ratio:.2f}x"
    assert f"| engine, {fastest['name']} | 2 |" in report and "| engine, 2 | direct |" in report
    profile = results["profile"]
    assert profile["rows"] == 2 and profile["time"] == "host" and len(profile["top"]) > 5
    assert any("conv" in row["name"] for row in profile["top"][:5])  # a UNet's time is mostly convs
    assert sum(row["share"] for row in profile["top"]) <= 1.0 + 1e-6
    assert "Profile: one UNet call of 2 rows" in report


def test_a_vae_row_that_fails_is_recorded_and_the_others_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_compile(*args: object, **kwargs: object) -> None:
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(gpu, "VAEDecoder", broken_compile)
    argv = ["--quick", "--steps", "2", "--batches", "1", "--ablation-batch", "2"]
    argv += ["--skip", "precision", "ours", "diffusers", "engine", "worker", "ablations"]
    gpu.main([*argv, "--out", str(tmp_path)])  # exit status 1: no "ours" figures, skipped here
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert results["stages"]["vae"]["status"] == "ok"
    rows = results["vae"]["rows"]
    assert [("error" in row) for row in rows] == [False, False, False, True]
    assert "inductor failed" in rows[3]["error"] and rows[1]["s"] > 0
    assert results["vae"]["fallback"]["float16_decodes_overflowed"] == 2
    assert results["vae"]["fallback"]["fallback_max_level_diff_vs_float32"] == 0
    assert (
        "| float16, decoder compiled | channels_last | failed: RuntimeError: inductor failed |"
        in (tmp_path / "gpu_bench.md").read_text()
    )


def test_ablations_can_be_chosen_by_key(tmp_path: Path) -> None:
    argv = ["--quick", "--steps", "2", "--batches", "1", "--ablation-batch", "1", "--engine-requests", "2"]
    argv += ["--skip", "precision", "diffusers", "engine", "worker", "--ablations", "compile", "default"]
    assert gpu.main([*argv, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    # the bench's order, whatever the order asked: the fast path first, the slow compile last
    assert [row["name"] for row in results["ablations"]] == [
        "fast path (default)",
        "+ torch.compile (default mode) in the graphs",
    ]


def test_mfu_uses_the_published_sd15_costs_and_the_cards_peak() -> None:
    results = {
        "meta": {"steps": 50, "peak_tflops": 989.0},
        "flops": {
            "unet_cfg_step_flop": gpu_runs.SD15_UNET_CFG_STEP_FLOP,
            "vae_decode_flop": gpu_runs.SD15_VAE_DECODE_FLOP,
        },
    }
    timing = gpu_runs.Timing(total_s=4.0, text_s=0.05, step_s=0.075, decode_s=0.2)
    row = gpu.timing_row(results, 16, timing, [4.0])
    assert row["images_per_s"] == pytest.approx(4.0)
    assert row["mfu"] == pytest.approx(16 * (50 * 1.61e12 + 2.5e12) / 4.0 / 989e12)  # ~83 TFLOP an image
    assert row["step_mfu"] == pytest.approx(16 * 1.61e12 / 0.075 / 989e12)
    assert row["ms_per_step"] == pytest.approx(75.0)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_is_read_off_the_drivers_name(name: str, peak: float | None) -> None:
    assert gpu_runs.peak_tflops(name) == peak


def test_report_of_a_partial_run_names_what_did_not_run() -> None:
    results = {
        "meta": {
            "device_name": "NVIDIA H100 80GB HBM3",
            "device": "cuda",
            "date": "2026-01-01 00:00 UTC",
            "torch": "2.11.0",
            "cuda": "13.0",
            "python": "3.12.3",
            "command": "python bench/gpu.py",
            "config": "sd15",
            "size": 512,
            "steps": 50,
            "guidance": 7.5,
            "peak_tflops": 989.0,
        },
        "stages": {"build": {"status": "ok"}, "worker": {"status": "error: RuntimeError: no redis-server"}},
        "ours": [{"batch": 16, "images_per_s": 4.2, "ms_per_step": 70.0, "mfu": 0.35, "step_mfu": 0.37}],
    }
    report = markdown(results)
    assert "### NVIDIA H100 80GB HBM3 (cuda)" in report
    assert "| 16 | 4.200 | n/a | n/a | 70.0 | n/a | 35.0% | n/a | 37.0% |" in report
    assert "- worker: error: RuntimeError: no redis-server" in report


def test_gpu_run_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_run.sh")], check=True)
