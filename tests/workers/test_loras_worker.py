"""LoRAs in a real worker (SD_LORA_DIR): requests with different LoRA sets share the UNet calls and
each picture equals the request alone; a corrupt file and a LoRA for another base model fail their
own job clearly while the worker and the other jobs go on; the listing rides in the heartbeat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.image_files import read_parameters
from models.loading import load_model
from models.lora.library import LoraLibrary
from models.lora.pool import LoraPool
from models.pipeline import generate
from schemas.generation import Generation
from tests.support.jobs import enqueue, fetch, params, png_pixels, result_of, wait_terminal, worker_info
from tests.support.lora_files import random_lora, write_kohya, write_peft

JOBS_BOUND_S = 240  # a hang guard, not a speed requirement


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = load_model(tiny_model_dir)
    folder = tmp_path_factory.mktemp("worker-loras")
    write_peft(random_lora(model, seed=1, rank=4, alpha=8.0, locon=True), folder / "a.safetensors")
    write_kohya(random_lora(model, seed=2, rank=8, alpha=4.0), folder / "b.safetensors")
    c = random_lora(model, seed=3, rank=2, alpha=2.0)
    c.layers["text_encoder"].clear()
    write_peft(c, folder / "c.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    wrong = random_lora(model, seed=4)  # a cross-attention for a 77-wide text context: another model's
    wrong.layers["unet"] = {
        name: (
            down[:, :1].expand(-1, 77).contiguous() if name.endswith(("attn2.to_k", "attn2.to_v")) else down,
            up,
        )
        for name, (down, up) in wrong.layers["unet"].items()
    }
    write_kohya(wrong, folder / "wrong.safetensors")
    return folder


def test_mixed_lora_sets_share_calls_equal_alone_and_bad_files_fail_alone(
    client, start_worker, tiny_model_dir: Path, lora_dir: Path
) -> None:
    worker = start_worker(
        SD_LORA_DIR=str(lora_dir),
        SD_LORA_SLOTS="4",
        SD_LORA_MAX_RANK="8",
        SD_SLOTS="8",
        SD_MAX_BATCH_ROWS="16",
    )
    listing = {info.name: info for info in worker_info(client, worker.name).loras}
    assert sorted(listing) == ["a", "b", "broken", "c", "wrong"]
    assert listing["a"].usable and listing["a"].format == "peft" and listing["b"].format == "kohya"
    assert not listing["broken"].usable and not listing["wrong"].usable, listing["wrong"]

    good = [
        params(prompt="a red circle <lora:a:1>", seed=1, steps=5),
        params(prompt="a blue square <lora:b:0.7> <lora:c:-1>", seed=2, steps=4, guidance_scale=1.0),
        params(prompt="a green ring", loras=[{"name": "c", "weight": 1.5}], seed=3, steps=6),
        params(prompt="a plain picture", seed=4, steps=5),
    ]
    bad = {
        "broken": params(prompt="x <lora:broken:1>", steps=3),
        "wrong": params(prompt="x <lora:wrong:1>", steps=3),
    }
    jobs = [(enqueue(client, p).id, p) for p in good]
    failing = {key: enqueue(client, p).id for key, p in bad.items()}
    outcomes = wait_terminal(client, [*[j for j, _ in jobs], *failing.values()], JOBS_BOUND_S)
    assert [outcomes[j] for j, _ in jobs] == ["finished"] * 4, outcomes
    assert outcomes[failing["broken"]] == outcomes[failing["wrong"]] == "failed"
    errors = {key: fetch(client, job_id).latest_result().exc_string or "" for key, job_id in failing.items()}
    assert "broken.safetensors is not a readable .safetensors file" in errors["broken"], errors["broken"]
    assert "another base model" in errors["wrong"] and "attn2.to_" in errors["wrong"], errors["wrong"]

    # alone, in this process, on a fresh copy of the model with its own pool
    model = load_model(tiny_model_dir)
    library = LoraLibrary(lora_dir, model, LoraPool(model.unet, slots=4, max_rank=8), max_per_request=4)
    for job_id, job_params in jobs:
        request = Generation.model_validate(job_params)
        (alone,) = generate(model, request, loras=library)
        (ref,) = result_of(client, job_id).images
        png = client.get(ref.key)
        assert int(np.abs(png_pixels(png).astype(int) - alone.astype(int)).max()) <= 1, job_params["prompt"]
        text = read_parameters(png) or ""
        for lora in request.loras:
            assert f"<lora:{lora.name}:{lora.weight:g}>" in text and f"{lora.name}: " in text, text
    assert worker.running
    stats = worker_info(client, worker.name).stats
    assert stats.max_requests_per_call >= 3, stats  # the LoRA sets shared UNet calls


def test_lora_settings_that_cannot_work_stop_the_worker_at_start(tmp_path: Path) -> None:
    from workers.loras import build_library
    from workers.settings import ConfigurationError, load_settings

    with pytest.raises(ConfigurationError, match="SD_LORA_DIR and SD_FUSE_PROJECTIONS"):
        load_settings(lora_dir=str(tmp_path), fuse_projections=True)
    with pytest.raises(
        ConfigurationError, match="SD_LORA_SLOTS=2 must be at least SD_MAX_LORAS_PER_REQUEST=4"
    ):
        load_settings(lora_dir=str(tmp_path), lora_slots=2)
    with pytest.raises(ConfigurationError, match="SD_LORA_DIR: .*missing is not a folder"):
        build_library(load_settings(lora_dir=str(tmp_path / "missing")), model=None)  # type: ignore[arg-type]
