"""A real worker serving a tiny SDXL model (issue 17): it publishes its family and native size, its
concurrent SDXL requests (different size fields, steps, samplers, negative prompt or not) share UNet
calls, each picture equal to the same request alone within 1 level, and an SD worker refuses SDXL's
size fields with a clear error."""

from __future__ import annotations

from pathlib import Path

from models.loading import load_model
from tests.support.jobs import enqueue, fetch, params, wait_terminal, wait_until, worker_info
from tests.support.pictures import assert_pngs_equal_alone_runs
from tests.support.worker_process import WorkerProcess

JOBS_BOUND_S = 240  # hang guard only

SIZED = dict(original_size=(1024, 768), crops_coords_top_left=(32, 16), target_size=(512, 512))
REQUESTS = (
    dict(sampler="ddim", steps=6, negative_prompt="blurry"),
    dict(sampler="euler", steps=5, **SIZED),
    dict(sampler="dpmpp_2m", scheduler="karras", steps=6, negative_prompt="a square", original_size=(64, 64)),
    dict(sampler="euler_ancestral", steps=4, guidance_scale=1.0, num_images=2),
    dict(sampler="ddim", steps=5, width=48, crops_coords_top_left=(8, 0)),  # another size: its own calls
)


def test_sdxl_worker_batches_requests_and_equals_alone_runs(
    client, redis_url: str, sdxl_models: dict[str, Path]
) -> None:
    env = {
        "REDIS_URL": redis_url,
        "SD_MODEL": str(sdxl_models["sdxl"]),
        "SD_SLOTS": "6",
        "SD_MAX_BATCH_ROWS": "16",
    }
    with WorkerProcess(env) as worker:
        info = worker_info(client, worker.name)
        assert (info.family, info.native_width, info.native_height) == ("sdxl", 64, 64)
        assert "SDXL, native size 64x64" in worker.logs()
        jobs = [
            (enqueue(client, p).id, p)
            for p in (params(prompt=f"a circle number {i}", seed=10 + i, **r) for i, r in enumerate(REQUESTS))
        ]
        outcomes = wait_terminal(client, [job_id for job_id, _ in jobs], JOBS_BOUND_S)
        assert set(outcomes.values()) == {"finished"}, outcomes
        model = load_model(sdxl_models["sdxl"])
        for job_id, job_params in jobs:
            assert_pngs_equal_alone_runs(client, model, job_id, job_params)
        wait_until(
            lambda: worker_info(client, worker.name).stats.jobs_succeeded == 5, 10, "published counters"
        )
        assert worker_info(client, worker.name).stats.max_requests_per_call >= 3


def test_sd_worker_refuses_sdxl_size_fields(client, start_worker) -> None:
    worker = start_worker()
    assert worker_info(client, worker.name).family == "sd"
    job_id = enqueue(client, params(steps=2, target_size=(512, 512)), retries=0).id
    assert wait_terminal(client, [job_id], 120) == {job_id: "failed"}
    assert "target_size is an SDXL size condition" in (fetch(client, job_id).latest_result().exc_string or "")
