"""LoRAs in the engine: a job whose LoRA finds every pool slot held waits, unstarted, until a running
job's images release one, then runs and equals its alone run; a bad LoRA fails its job alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.loading import load_model
from models.lora.library import LoraLibrary
from models.lora.pool import LoraPool
from models.pipeline import Pipeline, generate
from schemas.errors import ErrorType
from schemas.generation import Generation
from tests.support.jobs import max_pixel_diff, params
from tests.support.lora_files import random_lora, write_kohya
from tests.workers.test_engine import FakeProgress, FakeResults, finish
from workers.engine import Engine, EngineConfig
from workers.errors import RequestFailed
from workers.submission import Submission


@pytest.fixture
def engine_with_one_slot(
    tiny_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[Engine, FakeResults, LoraLibrary]]:
    model = load_model(tiny_model_dir)
    for seed, name in ((1, "a"), (2, "b")):
        write_kohya(random_lora(model, seed=seed, rank=4), tmp_path / f"{name}.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file")
    library = LoraLibrary(tmp_path, model, LoraPool(model.unet, slots=1, max_rank=4), max_per_request=2)
    results = FakeResults()
    engine = Engine(
        model,
        EngineConfig(max_batch_rows=16, vae_batch=2, idle_wait_s=0.05),
        results,
        FakeProgress(),
        pipeline_factory=lambda m: Pipeline(m, loras=library),
    )
    engine.start()
    yield engine, results, library
    engine.drain(0)
    engine.join(30)


def test_a_job_waits_for_a_slot_then_equals_its_alone_run(engine_with_one_slot) -> None:
    engine, results, library = engine_with_one_slot
    jobs = [
        Submission("long-a", Generation.model_validate(params(prompt="x <lora:a:1>", steps=8, seed=1))),
        Submission("short-b", Generation.model_validate(params(prompt="y <lora:b:0.5>", steps=2, seed=2))),
        Submission("plain", Generation.model_validate(params(prompt="z", steps=2, seed=3))),
        Submission("bad-c", Generation.model_validate(params(prompt="w <lora:c:1>", steps=2, seed=4))),
    ]
    for job in jobs:
        engine.submit(job)
    finish(jobs)
    # b needs a's slot: it ran after a, though far shorter; the LoRA-free job did not wait
    assert results.order.index("long-a") < results.order.index("short-b")
    assert results.order.index("plain") < results.order.index("long-a")
    with pytest.raises(RequestFailed) as failure:
        jobs[3].outcome()
    assert failure.value.error_type == ErrorType.INVALID_REQUEST and "c.safetensors" in str(failure.value)
    for job in jobs[:3]:
        (alone,) = generate(engine.model, job.params, loras=library)
        assert max_pixel_diff(results.pictures[job.job_id][0], alone) <= 1, job.job_id
