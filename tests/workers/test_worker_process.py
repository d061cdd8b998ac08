"""Real worker processes against the private Redis, jobs enqueued exactly as the API enqueues them:
continuous batching with pictures equal to alone-runs, cancel, out-of-memory, and what RQ records."""

from __future__ import annotations

from rq.registry import CanceledJobRegistry

from schemas.queue import queue_name
from schemas.redis_keys import cancel_key, progress_key
from tests.support.jobs import (
    enqueue,
    fetch,
    params,
    result_of,
    status,
    wait_terminal,
    wait_until,
    worker_info,
)
from tests.support.pictures import assert_pngs_equal_alone_runs

JOBS_BOUND_S = 240  # hang guard only, never a speed requirement


def test_concurrent_jobs_share_unet_calls_and_equal_alone_runs(client, start_worker, tiny_model) -> None:
    worker = start_worker(SD_SLOTS="8", SD_MAX_BATCH_ROWS="16")
    jobs = []
    for i in range(8):
        job_params = params(
            prompt=f"a red circle number {i}",
            seed=100 + i,
            steps=4 + i % 4,
            guidance_scale=(1.0, 5.0, 7.5, 12.0)[i % 4],
            negative_prompt="blurry" if i % 3 == 0 else "",
            width=48 if i == 7 else 64,  # one request of another size
        )
        jobs.append((enqueue(client, job_params).id, job_params))
    outcomes = wait_terminal(client, [job_id for job_id, _ in jobs], JOBS_BOUND_S)
    assert set(outcomes.values()) == {"finished"}, outcomes
    for job_id, job_params in jobs:
        assert_pngs_equal_alone_runs(client, tiny_model, job_id, job_params)
        result = result_of(client, job_id)
        assert result.model == "tiny-sd1"
        assert {"queue_wait_s", "run_s", "total_s"} <= result.timings.keys()
        assert client.hgetall(progress_key(job_id)) == {
            b"step": str(job_params["steps"]).encode(),
            b"total_steps": str(job_params["steps"]).encode(),
            b"attempt": fetch(client, job_id).worker_name.encode(),
        }
    wait_until(lambda: worker_info(client, worker.name).stats.jobs_succeeded == 8, 10, "published counters")
    info = worker_info(client, worker.name)
    assert info.stats.max_requests_per_call > 1  # UNet calls carried several requests
    assert info.stats.unet_requests > info.stats.unet_calls
    assert info.stats.images_generated == 8
    assert (info.model, info.native_width, info.native_height, info.size_multiple) == ("tiny-sd1", 64, 64, 8)
    assert (info.device, info.dtype, info.max_batch_rows, info.slots) == ("cpu", "float32", 16, 8)


def test_running_job_canceled_within_two_steps_others_succeed(client, start_worker, tiny_model) -> None:
    start_worker(SD_SLOTS="3", SD_MAX_BATCH_ROWS="8")
    doomed = enqueue(client, params(steps=150, width=128, height=128, seed=1)).id
    others = [(enqueue(client, p).id, p) for p in (params(steps=12, seed=2), params(steps=20, seed=3))]
    wait_until(lambda: int(client.hget(progress_key(doomed), "step") or 0) >= 2, 60, "the job to run")
    client.set(cancel_key(doomed), b"1", ex=600)  # what the API's DELETE does for a running job
    asked_at = int(client.hget(progress_key(doomed), "step"))
    wait_terminal(client, [doomed], 60)
    job = fetch(client, doomed)
    assert job.get_status().value == "canceled"
    assert doomed in CanceledJobRegistry(queue_name("tiny-sd1"), connection=client)
    assert int(client.hget(progress_key(doomed), "step")) <= asked_at + 2
    assert job.meta.get("owner") == "test"  # the API's meta survives
    assert job.ended_at is not None
    outcomes = wait_terminal(client, [job_id for job_id, _ in others], JOBS_BOUND_S)
    assert set(outcomes.values()) == {"finished"}
    for job_id, job_params in others:
        assert_pngs_equal_alone_runs(client, tiny_model, job_id, job_params)


def test_injected_out_of_memory_splits_the_batch_and_every_job_succeeds(
    client, start_worker, tiny_model
) -> None:
    worker = start_worker(SD_SLOTS="5", SD_MAX_BATCH_ROWS="16", SD_TEST_OOM_ABOVE_ROWS="2")
    jobs = [(enqueue(client, p).id, p) for p in (params(seed=s, steps=5) for s in range(4))]
    pair = params(seed=50, num_images=2, steps=5)  # 4 rows even alone: split per image
    jobs.append((enqueue(client, pair).id, pair))
    outcomes = wait_terminal(client, [job_id for job_id, _ in jobs], JOBS_BOUND_S)
    assert set(outcomes.values()) == {"finished"}, outcomes
    for job_id, job_params in jobs:
        assert_pngs_equal_alone_runs(client, tiny_model, job_id, job_params)
    wait_until(lambda: worker_info(client, worker.name).stats.jobs_succeeded == 5, 10, "published counters")
    stats = worker_info(client, worker.name).stats
    assert stats.oom_splits >= 1
    assert stats.call_rows_limit < 16  # halved, and every call since fits the simulated memory
    assert stats.last_batch_rows <= 2
    assert "out of memory in a UNet call" in worker.logs()


def test_failing_request_fails_alone_with_a_clear_error(client, start_worker) -> None:
    worker = start_worker(SD_SLOTS="3")
    bad = enqueue(client, params(prompt="cat " * 601, seed=1)).id  # valid for the contract, too long for CLIP
    garbage = enqueue(client, {"prompt": "x", "steps": "many"}).id  # not even a Generation
    good = enqueue(client, params(seed=2)).id
    outcomes = wait_terminal(client, [bad, garbage, good], JOBS_BOUND_S)
    assert outcomes == {bad: "failed", garbage: "failed", good: "finished"}
    error = fetch(client, bad).meta["error"]
    assert (
        error["type"] == "InvalidRequest"
        and "prompt is 601 CLIP tokens long; at most 600" in error["message"]
    )
    assert fetch(client, garbage).meta["error"]["type"] == "InvalidParams"
    # not retried (it would only fail again): it ran once
    assert worker.logs().count(f"job {bad} failed") == 1
    assert status(client, good) == "finished"
