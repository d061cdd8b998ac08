"""The whole job lifecycle through a real API process and a real worker process with a small model:
queued (with its queue position), running with step progress, succeeded, and the PNG of the requested
size whose `parameters` chunk holds the prompt and the seed. Also a cancelled running job."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from tests.support.api import publish_worker
from tests.support.api_process import ApiProcess
from tests.support.worker_process import WorkerProcess

PROMPT = "a red circle in the top left on a blue background"


def poll(client: httpx.Client, job_id: str, until: set[str], timeout_s: float = 120) -> list[dict]:
    """Every distinct status document seen until the job reaches one of `until`."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if not seen or job != seen[-1]:
            seen.append(job)
        if job["status"] in until:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {seen[-1]['status']} after {timeout_s} s")


@pytest.mark.timeout(300)
def test_queued_running_succeeded_png(redis_url: str, random_models: dict[str, Path]) -> None:
    with ApiProcess({"REDIS_URL": redis_url}) as api, httpx.Client(base_url=api.url, timeout=10) as client:
        # the model is served (a worker's heartbeat: jobs for it are accepted), and no worker takes jobs yet
        with redis.Redis.from_url(redis_url) as db:
            publish_worker(db, name="not-taking-jobs", model="sd1", ttl_s=5)
        body = {
            "prompt": PROMPT,
            "negative_prompt": "green",
            "width": 96,
            "height": 64,
            "steps": 40,
            "seed": 4242,
        }
        submitted = client.post("/v1/txt2img", json=body)
        assert submitted.status_code == 202
        job_id = submitted.json()["id"]
        assert submitted.headers["location"] == f"/v1/jobs/{job_id}"
        queued = client.get(f"/v1/jobs/{job_id}").json()
        assert queued["status"] == "queued" and queued["queue_position"] == 0  # no worker yet

        worker = WorkerProcess({"REDIS_URL": redis_url, "SD_MODEL": str(random_models["sd1"])}).start()
        try:
            history = poll(client, job_id, {"succeeded", "failed", "canceled"})
        finally:
            worker.stop()

        running = [j for j in history if j["status"] == "running"]
        assert running, "never saw the job running"
        steps = [j["progress"]["step"] for j in running]
        assert any(0 < s < 40 for s in steps), steps  # progress seen mid-run
        assert steps == sorted(steps) and all(j["progress"]["total_steps"] == 40 for j in running)
        done = history[-1]
        assert done["status"] == "succeeded", done
        assert done["request"]["seed"] == 4242 and done["progress"]["step"] == 40
        assert done["started_at"] and done["finished_at"] and done["error"] is None

        png = client.get(done["images"][0]["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png.content))
        assert image.size == (96, 64)
        parameters = image.text["parameters"]
        assert parameters.startswith(PROMPT + "\nNegative prompt: green\n")
        assert "Seed: 4242" in parameters and "Steps: 40" in parameters and "Size: 96x64" in parameters


@pytest.mark.timeout(300)
def test_cancel_running_job(redis_url: str, random_models: dict[str, Path]) -> None:
    env = {"REDIS_URL": redis_url, "SD_MODEL": str(random_models["sd1"])}
    with ApiProcess({"REDIS_URL": redis_url}) as api, WorkerProcess(env).start() as worker:
        with httpx.Client(base_url=api.url, timeout=10) as client:
            long_job = client.post("/v1/txt2img", json={"prompt": PROMPT, "steps": 150, "seed": 1}).json()[
                "id"
            ]
            short_job = client.post("/v1/txt2img", json={"prompt": PROMPT, "steps": 20, "seed": 2}).json()[
                "id"
            ]
            deadline = time.monotonic() + 60
            while client.get(f"/v1/jobs/{long_job}").json()["progress"]["step"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            answer = client.delete(f"/v1/jobs/{long_job}")
            assert answer.status_code in (200, 202), answer.text
            cancelled = poll(client, long_job, {"succeeded", "failed", "canceled"})[-1]
            assert cancelled["status"] == "canceled", cancelled
            assert cancelled["progress"]["step"] < 150
            assert poll(client, short_job, {"succeeded", "failed", "canceled"})[-1]["status"] == "succeeded"
        assert worker.running
