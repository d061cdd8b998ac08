"""bench/gpu.py on the CPU (--quick: tiny config, the same code paths as on a GPU), its figures
(images/s, MFU against the card's peak), its kernel classes, and bench/gpu_run.sh's syntax.

One quick run of every stage but the worker is shared by the tests that read its results (a run
costs about half a minute here, mostly torch.compile tracing the UNet)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench")]

import gpu  # noqa: E402
import gpu_runs  # noqa: E402
from gpu_report import markdown  # noqa: E402

QUICK = ["--quick", "--steps", "2", "--batches", "1", "--ablation-batch", "1", "--engine-requests", "2"]


@dataclass
class QuickRun:
    status: int  # gpu.main's exit status
    results: dict[str, Any]  # gpu_bench.json
    report: str  # gpu_bench.md


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """Every stage but the worker and SDXL's (test_quick_mode_sdxl_stage), the compiled engine pass
    (eager backend on the CPU) and the profile included."""
    out = tmp_path_factory.mktemp("gpu-bench")
    threads = torch.get_num_threads()
    try:
        status = gpu.main(
            [*QUICK, "--engine-compile", "--profile", "--skip", "worker", "sdxl", "--out", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "gpu_bench.json").read_text())
    return QuickRun(status, results, (out / "gpu_bench.md").read_text())


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_mode_runs_every_stage_and_writes_its_results(quick: QuickRun) -> None:
    assert quick.status == 0
    results = quick.results
    statuses = {name: stage["status"] for name, stage in results["stages"].items()}
    assert statuses.pop("worker") == statuses.pop("sdxl") == "skipped (--skip)"
    assert set(statuses.values()) == {"ok"}, statuses
    assert [row["batch"] for row in results["ours"]] == [1] and results["ours"][0]["images_per_s"] > 0
    assert [row["batch"] for row in results["diffusers"]] == [1]
    rows = results["precision"]["rows"]
    assert rows["float16 eager"]["pass"] and rows["float16 fast path"]["pass"]
    assert rows["bfloat16 eager"]["pass"] is None  # reported, no bar
    assert results["flops"]["source"] == "counted" and results["flops"]["unet_cfg_step_flop"] > 0


def test_quick_mode_engine_loads_plain_and_compiled(quick: QuickRun) -> None:
    results, report = quick.results, quick.report
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
    assert f"| engine, {fastest['name']} | 2 |" in report and "| engine, 2 | direct |" in report


def test_quick_mode_times_the_png_and_decode_tail_after_the_last_unet_call(quick: QuickRun) -> None:
    for row in quick.results["engine"]:
        tail = row["tail"]
        # 2 jobs finish at the same step: one decode call of both, then their PNGs
        assert tail["decode_calls"] == 1 and 0 < tail["decode_s"] < tail["after_last_unet_s"] < row["span_s"]
        assert 0 <= tail["last_decode_to_last_png_s"] < tail["after_last_unet_s"]
        assert tail["png_encode_s"] > 0
    assert "| engine, 2 | " in quick.report.split("PNG/decode tail")[1]


def test_quick_mode_ablations_in_order_with_their_outputs_kept(quick: QuickRun) -> None:
    results, report = quick.results, quick.report
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
    for row in results["ablations"]:  # outputs kept (bfloat16 has 3 fewer mantissa bits)
        assert row["vs_default_relative_error"] < (5e-2 if "bfloat16" in row["name"] else 1e-3), row["name"]
    assert "| batch | ours img/s | diffusers img/s" in report and "| ablation (batch 1)" in report
    # each ablation against diffusers at the same batch, same run
    default_row = next(line for line in report.splitlines() if line.startswith("| fast path (default) |"))
    vs_default, vs_diffusers = default_row.split("|")[4:6]
    ratio = results["ablations"][0]["images_per_s"] / results["diffusers"][0]["images_per_s"]
    assert vs_default.strip() == "1.00x" and vs_diffusers.strip() == f"{ratio:.2f}x"


def test_quick_mode_decodes_alone_within_a_level_and_falls_back_on_overflow(quick: QuickRun) -> None:
    # the decode alone: float16 pixels within a level of float32's (any layout, compiled or not), the
    # fallback takes over an overflow
    vae_rows = quick.results["vae"]["rows"]
    assert [(r["vae_dtype"], r["layout"]) for r in vae_rows] == [
        ("float32", "channels_last"),
        ("float16", "channels_last"),
        ("float16, other layout", "contiguous"),
        ("float16, decoder compiled", "channels_last"),
    ]
    assert vae_rows[0]["max_level_diff"] == 0
    assert all(r["max_level_diff"] <= 1 and r["s"] > 0 for r in vae_rows)
    assert quick.results["vae"]["fallback"] == {
        "latents": 2,
        "float16_decodes_overflowed": 2,
        "fallback_max_level_diff_vs_float32": 0,
    }
    assert "| float16 | channels_last | 1 | 8 |" in quick.report


def test_quick_mode_profiles_one_eager_unet_call(quick: QuickRun) -> None:
    profile = quick.results["profile"]
    assert profile["rows"] == 2 and profile["time"] == "host" and len(profile["top"]) > 5
    assert any("conv" in row["name"] for row in profile["top"][:5])  # a UNet's time is mostly convs
    assert sum(row["share"] for row in profile["top"]) <= 1.0 + 1e-6
    assert "Profile: one UNet call of 2 rows" in quick.report


def test_quick_mode_groups_the_compiled_calls_time_by_kind_of_kernel(quick: QuickRun) -> None:
    kernels = quick.results["kernels"]
    assert kernels["rows"] == 2 and kernels["time"] == "host" and kernels["graph_call_ms"] > 0  # 2x batch 1
    kinds = {row["kind"]: row for row in kernels["kinds"]}
    assert list(kinds) == list(gpu_runs.KERNEL_KINDS)
    assert sum(row["share"] for row in kinds.values()) == pytest.approx(1.0)
    for kind in ("convolution", "GEMM", "attention", "elementwise/normalization"):
        assert kinds[kind]["ms_per_call"] > 0 and kinds[kind]["launches_per_call"] > 0, kind
    assert "conv" in kinds["convolution"]["largest"] and "attention" in kinds["attention"]["largest"]
    assert all(row["kind"] == gpu_runs.kernel_kind(row["name"]) for row in kernels["top"])
    assert "Kernels of one compiled UNet call of 2 rows" in quick.report
    assert "| convolution | " in quick.report


def test_quick_mode_times_finer_buckets_between_32_and_64_rows(quick: QuickRun) -> None:
    # on a GPU every 8 rows from 32 to 64; the CPU check's compiled graph holds at most 15 rows, so
    # it adds 6 and times 5 rows (8 with the default buckets)
    assert gpu.parse_args(["--device", "cpu"]).fine_buckets == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    buckets = quick.results["buckets"]
    assert buckets["fine"] == [1, 2, 4, 6, 8, 16, 24, 32, 40, 48, 56, 64]
    (row,) = buckets["rows"]
    assert (row["rows"], row["default_bucket"], row["fine_bucket"]) == (5, 8, 6)
    assert row["default_ms"] > 0 and row["fine_ms"] > 0
    assert row["fine_speedup"] == pytest.approx(row["default_ms"] / row["fine_ms"])
    assert "| 5 | 8 | " in quick.report


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        # cuDNN convolutions (Hopper's implicit GEMMs, an older Winograd, the generic one)
        (
            "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1"
            "_g1_execute_segment_k_off_kernel__5x_cudnn",
            "convolution",
        ),
        ("cudnn_infer_ampere_scudnn_winograd_128x128_ldg1_ldg4_relu_tile148t_nt_v1", "convolution"),
        (
            "void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>",
            "convolution",
        ),
        ("triton_tem_fused_convolution_0", "convolution"),
        ("aten::mkldnn_convolution", "convolution"),
        # GEMMs: cuBLAS (its nvjet kernels too), CUTLASS, inductor's matmul templates, the CPU's addmm
        (
            "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_kernel__5x_cublas",
            "GEMM",
        ),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NTN", "GEMM"),
        ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_64x3_tn", "GEMM"),
        ("void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_256x128_32x3_nn_align8>", "GEMM"),
        ("triton_tem_fused_addmm_gelu_1", "GEMM"),
        ("aten::addmm", "GEMM"),
        # attention: flash, memory-efficient (CUTLASS), cuDNN's (an "fprop"), the CPU's
        (
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, cutlass::half_t>>",
            "attention",
        ),
        (
            "fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<>::Params)",
            "attention",
        ),
        (
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0",
            "attention",
        ),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        # elementwise and normalization: inductor's fused kernels (named after what they fuse, a
        # convolution's bias included), ATen's, cuDNN's layout copies
        ("triton_poi_fused_convolution_silu_7", "elementwise/normalization"),
        ("triton_red_fused_native_group_norm_silu_3", "elementwise/normalization"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>",
            "elementwise/normalization",
        ),
        (
            "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>",
            "elementwise/normalization",
        ),
        (
            "void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true>",
            "elementwise/normalization",
        ),
        ("aten::native_group_norm", "elementwise/normalization"),
        ("aten::add_", "elementwise/normalization"),
        # copies, allocations
        ("Memcpy HtoD (Pageable -> Device)", "other"),
        ("aten::empty", "other"),
    ],
)
def test_kernels_are_grouped_by_kind_from_their_names(name: str, kind: str) -> None:
    assert gpu_runs.kernel_kind(name) == kind


def test_a_vae_row_that_fails_is_recorded_and_the_others_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_compile(*args: object, **kwargs: object) -> None:
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(gpu, "VAEDecoder", broken_compile)
    argv = ["--quick", "--steps", "2", "--batches", "1", "--ablation-batch", "2"]
    argv += [
        "--skip",
        "precision",
        "ours",
        "kernels",
        "buckets",
        "diffusers",
        "engine",
        "worker",
        "ablations",
    ]
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
    skip = ["precision", "vae", "kernels", "buckets", "diffusers", "engine", "worker"]
    argv = [*QUICK, "--skip", *skip]
    assert gpu.main([*argv, "--ablations", "compile", "default", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    # the bench's order, whatever the order asked: the fast path first, the slow compile last
    assert [row["name"] for row in results["ablations"]] == [
        "fast path (default)",
        "+ torch.compile (default mode) in the graphs",
    ]


def test_the_worker_takes_the_fastest_compiled_ablation_through_its_environment() -> None:
    args = gpu.parse_args([*QUICK, "--worker-compile"])
    bench = gpu.Bench.create(args)
    bench.results["ablations"] = [
        {"key": "default", "compiled": True, "images_per_s": 1.0},
        {"key": "buckets-fine", "compiled": True, "images_per_s": 1.2},
        {"key": "graphs", "compiled": False, "images_per_s": 3.0},
    ]
    env = gpu.worker_env(bench)
    assert env["SD_CUDA_GRAPH_BUCKETS"] == ",".join(str(rows) for rows in args.fine_buckets)
    assert env["SD_COMPILE"] == "default" and env["SD_COMPILE_DYNAMIC_BATCH"] == "true"
    bench.results["ablations"][1]["images_per_s"] = 0.5
    assert "SD_CUDA_GRAPH_BUCKETS" not in gpu.worker_env(bench)


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


def test_quick_mode_sdxl_stage_against_diffusers(tmp_path: Path) -> None:
    """The SDXL stage alone on the tiny SDXL config (the compiled fast path, eager backend): both
    sides timed at each batch, their final latents the same picture, the report's table."""
    threads = torch.get_num_threads()
    try:
        argv = ["--quick", "--only", "sdxl", "--sdxl-steps", "2", "--out", str(tmp_path)]
        status = gpu.main(argv)
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert status == 0 and results["stages"]["sdxl"]["status"] == "ok"
    assert results["stages"]["ours"]["status"] == "skipped (--only)"
    sdxl = results["sdxl"]
    assert [row["batch"] for row in sdxl["ours"]] == [row["batch"] for row in sdxl["diffusers"]] == [1, 2]
    assert all(row["images_per_s"] > 0 for row in sdxl["ours"] + sdxl["diffusers"])
    assert sdxl["latents_relative_error"] < 1e-4  # float32 on the CPU: the same latents
    assert set(sdxl["speedup"]) == {"1", "2"}
    report = (tmp_path / "gpu_bench.md").read_text()
    assert "SDXL (tiny architecture" in report and "| 2 | " in report.split("SDXL (tiny")[1]
    assert "skipped (--only)" not in report
