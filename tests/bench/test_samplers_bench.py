"""bench/samplers.py --quick: a tiny random model's distances to the references, the embedded
model's held-out scores and the speed table, printed and written as JSON, in seconds."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from models.default_model import default_model_path
from models.loading import load_model
from training.checker import detect
from training.evaluate import generate_images, held_out_cases, score

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench")]

import samplers  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict[str, Any]]:
    """(exit status, stdout, JSON) of one quick run, shared by the tests."""
    out = tmp_path_factory.mktemp("samplers-bench") / "samplers.json"
    threads = torch.get_num_threads()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            status = samplers.main(["--quick", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    return status, printed.getvalue(), json.loads(out.read_text())


def test_quick_mode_prints_every_table(quick: tuple[int, str, dict[str, Any]]) -> None:
    status, printed, _ = quick
    assert status == 0
    assert "| sampler | against | latent RMS: 2 steps | 4 steps |" in printed
    assert "| sampler | against | pixel MAE (levels): 2 steps | 4 steps |" in printed
    assert "| sampler | steps | colour | shape | position | background | all three |" in printed
    assert "| sampler | Pipeline.step s | UNet call s |" in printed
    for label in ("ddim", "dpmpp_2m karras", "euler_ancestral"):
        assert f"| {label} | ODE |" in printed
    assert "| euler_ancestral | own 8 |" in printed  # a stochastic sampler against its own long run
    assert "Whole run:" in printed


def test_deterministic_samplers_converge_to_the_ode_reference(quick: tuple[int, str, dict[str, Any]]) -> None:
    (result,) = quick[2]["quality"]
    references = {x["reference"].split(" (")[0]: x for x in result["references"]}
    # two high-order solvers at the reference step count agree far better than two seeds' pictures
    assert references["uni_pc karras 8"]["latent_rms"] < 0.05 * references["another seed"]["latent_rms"]
    rows = {(x["variant"], x["against"]): x["cells"] for x in result["rows"]}
    for variant in ("ddim", "dpmpp_2m karras"):
        cells = rows[(variant, "ODE")]
        assert cells["4"]["latent_rms"] < cells["2"]["latent_rms"]  # JSON keys are strings
    # second order beats first order at equal steps
    assert rows[("dpmpp_2m karras", "ODE")]["4"]["latent_rms"] < rows[("ddim", "ODE")]["4"]["latent_rms"]
    for cells in rows.values():
        assert all(math.isfinite(v) and v >= 0 for cell in cells.values() for v in cell.values())


def test_held_out_scores_per_sampler_and_step_count(quick: tuple[int, str, dict[str, Any]]) -> None:
    rows = quick[2]["scores"]
    assert [(x["variant"], x["steps"]) for x in rows] == [
        (v, n) for v in ("ddim", "dpmpp_2m karras", "euler_ancestral") for n in (2, 4)
    ]
    assert all(x["images"] == 8 for x in rows)
    # the bench's mixed batches score ddim's pictures as training.evaluate's own generation does
    model = load_model(default_model_path())
    cases = held_out_cases(1)[:8]
    expected = score(
        cases, [detect(image) for image in generate_images(model, cases, 4, rows[1]["guidance_scale"])]
    )
    for name in ("colour", "shape", "position", "background", "all_three"):
        assert rows[1][name] == expected[name], name


def test_speed_rows_time_the_unet_and_the_rest(quick: tuple[int, str, dict[str, Any]]) -> None:
    rows = quick[2]["speed"]
    assert [x["variant"] for x in rows] == ["ddim", "dpmpp_2m", "euler_ancestral"]
    for x in rows:
        assert x["rows"] == 4  # 2 images with classifier-free guidance
        assert 0 < x["unet_s"] < x["step_s"]
        assert x["outside_unet_stub_s"] > 0
    assert rows[0]["added_vs_first"] == 0 and rows[0]["step_vs_first"] == 1
