"""Two models behind one API: real API, janitor and worker processes, one worker per model (two tiny
random models of different seeds) on one Redis. Requests for both models at once, through every
route, each picture equal to the same request run alone on its model; then one model's worker is
killed: the other model's jobs go on untouched, the dead model's requests are refused (503) rather
than queued, and its abandoned jobs are retried by a new worker of that model.

The processes are shared by the module's tests (started once: about 10 s of the run).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from models.loading import load_model
from models.pipeline import generate
from models.stable_diffusion import StableDiffusion
from schemas.generation import Generation
from schemas.queue import queue_name
from schemas.redis_keys import progress_key
from tests.support.api_process import ApiProcess
from tests.support.jobs import fetch, max_pixel_diff, png_pixels, wait_terminal, wait_until
from tests.support.pictures import assert_pngs_equal_alone_runs
from tests.support.redis_server import RedisServer
from tests.support.worker_process import JanitorProcess, WorkerProcess

A, B = "model-a", "model-b"
PROMPT = "a red circle in the top left on a blue background"
JOBS_BOUND_S = 120  # hang guard only
WORKER_ENV = {"SD_SLOTS": "4", "SD_MAX_BATCH_ROWS": "8"}


@dataclass
class Deployment:
    redis_url: str
    api: ApiProcess
    janitor: JanitorProcess
    workers: dict[str, WorkerProcess]
    dirs: dict[str, Path]
    models: dict[str, StableDiffusion]

    def worker(self, model: str) -> WorkerProcess:
        return WorkerProcess({"REDIS_URL": self.redis_url, "SD_MODEL": str(self.dirs[model]), **WORKER_ENV})


@pytest.fixture(scope="module")
def deployment(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    from models.random_model import build_random_model

    if redis_server.proc is None:
        redis_server.start()
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    root = tmp_path_factory.mktemp("two-models")
    dirs = {A: build_random_model("sd1", root / A, seed=1), B: build_random_model("sd1", root / B, seed=2)}
    url = redis_server.url
    api = ApiProcess({"REDIS_URL": url, "SD_WORKER_STALE_S": "3", "SD_JOB_RETRIES": "1"})
    janitor = JanitorProcess({"REDIS_URL": url, "SD_JANITOR_INTERVAL_S": "0.5"})
    deployed = Deployment(url, api, janitor, {}, dirs, {})
    deployed.workers = {model: deployed.worker(model) for model in (A, B)}
    for worker in deployed.workers.values():
        worker.launch()  # both load their models at once
    try:
        api.start()
        janitor.start()
        deployed.models = {model: load_model(path) for model, path in dirs.items()}  # for alone-runs
        for worker in deployed.workers.values():
            worker.wait_ready()
        yield deployed
    finally:
        for worker in deployed.workers.values():
            worker.kill()
        janitor.kill()
        api.cleanup()


def submit(api: ApiProcess, **fields: object) -> str:
    answer = httpx.post(f"{api.url}/v1/txt2img", json={"prompt": PROMPT, **fields}, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def resolved(api: ApiProcess, job_id: str) -> dict:
    """The Generation the API resolved for a job (model, defaults and seed filled in)."""
    return httpx.get(f"{api.url}/v1/jobs/{job_id}", timeout=10).json()["request"]


def alone(model: StableDiffusion, **fields: object) -> list[np.ndarray]:
    return generate(model, Generation(prompt=PROMPT, **fields))


def test_both_models_at_once_on_every_route_each_picture_as_alone(deployment: Deployment) -> None:
    api, client = deployment.api, redis.Redis.from_url(deployment.redis_url)
    models = httpx.get(f"{api.url}/v1/models").json()["data"]
    assert [(m["id"], m["workers"], m["default"]) for m in models] == [(A, 1, False), (B, 1, False)]
    ready = httpx.get(f"{api.url}/readyz").json()
    assert ready["ready"] and ready["models"] == {A: 1, B: 1}

    # OpenAI's and AUTOMATIC1111's routes answer once the images exist: in threads, beside the jobs
    answers: dict[str, httpx.Response] = {}
    small = {"width": 64, "height": 64}
    openai_body = {"model": B, "prompt": PROMPT, "size": "64x64", "steps": 5, "seed": 31, "response_format": "b64_json"}  # fmt: skip
    a1111_body = {"prompt": PROMPT, **small, "steps": 5, "seed": 41, "cfg_scale": 6, "sampler_name": "DDIM",
                  "override_settings": {"sd_model_checkpoint": A}}  # fmt: skip
    calls = [
        threading.Thread(target=lambda: answers.update(openai=httpx.post(f"{api.url}/v1/images/generations", json=openai_body, timeout=60))),  # noqa: E501
        threading.Thread(target=lambda: answers.update(a1111=httpx.post(f"{api.url}/sdapi/v1/txt2img", json=a1111_body, timeout=60))),  # noqa: E501
    ]  # fmt: skip
    for call in calls:
        call.start()
    jobs = [submit(api, model=model, **small, steps=4 + i, seed=10 + i) for i, model in enumerate([A, B] * 3)]
    outcomes = wait_terminal(client, jobs, JOBS_BOUND_S)
    for call in calls:
        call.join(JOBS_BOUND_S)
    assert set(outcomes.values()) == {"finished"}, outcomes

    for job_id in jobs:
        params = resolved(api, job_id)
        assert_pngs_equal_alone_runs(client, deployment.models[params["model"]], job_id, params)
        worker = deployment.workers[params["model"]]
        assert fetch(client, job_id).worker_name.startswith(worker.name)  # run by its model's worker
    # the two models draw differently: the routing is what made the pictures equal
    same_request = {"steps": 4, "seed": 10, **small}
    assert max_pixel_diff(alone(deployment.models[A], **same_request)[0], alone(deployment.models[B], **same_request)[0]) > 8  # fmt: skip

    openai = answers["openai"]
    assert openai.status_code == 200, openai.text
    picture = png_pixels(base64.b64decode(openai.json()["data"][0]["b64_json"]))
    assert max_pixel_diff(picture, alone(deployment.models[B], steps=5, seed=31, **small)[0]) <= 1
    a1111 = answers["a1111"]
    assert a1111.status_code == 200, a1111.text
    picture = png_pixels(base64.b64decode(a1111.json()["images"][0]))
    expected = alone(deployment.models[A], steps=5, seed=41, guidance_scale=6.0, **small)[0]
    assert max_pixel_diff(picture, expected) <= 1
    client.close()


def test_a_dead_models_jobs_wait_for_its_next_worker_and_the_other_model_goes_on(
    deployment: Deployment,
) -> None:
    api, client = deployment.api, redis.Redis.from_url(deployment.redis_url)
    doomed = [submit(api, model=A, width=64, height=64, steps=40, seed=50 + i) for i in range(2)]
    wait_until(
        lambda: all(int(client.hget(progress_key(j), "step") or 0) >= 1 for j in doomed),
        60,
        "A's jobs to run",
    )
    deployment.workers[A].kill()
    others = [submit(api, model=B, width=64, height=64, steps=6, seed=60 + i) for i in range(3)]
    assert set(wait_terminal(client, others, JOBS_BOUND_S).values()) == {"finished"}
    for job_id in others:
        job = fetch(client, job_id)
        assert job.worker_name.startswith(deployment.workers[B].name) and job.retries_left == 1  # untouched
        assert_pngs_equal_alone_runs(client, deployment.models[B], job_id, resolved(api, job_id))

    # once A's worker is seen dead (its heartbeat stale), A's requests are refused, not queued
    wait_until(
        lambda: httpx.get(f"{api.url}/readyz").json()["models"] == {A: 0, B: 1}, 30, "A's worker seen dead"
    )
    queued = client.llen(f"rq:queue:{queue_name(A)}")
    answer = httpx.post(f"{api.url}/v1/txt2img", json={"prompt": PROMPT, "model": A}, timeout=10)
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert (
        f"model '{A}' has no live worker" in answer.json()["detail"]
        and f"served: {B}" in answer.json()["detail"]
    )
    assert client.llen(f"rq:queue:{queue_name(A)}") == queued

    rescuer = deployment.workers[A] = deployment.worker(A).start()
    assert set(wait_terminal(client, doomed, JOBS_BOUND_S).values()) == {"finished"}
    for job_id in doomed:
        job = fetch(client, job_id)
        assert job.worker_name.startswith(rescuer.name) and job.retries_left == 0  # retried once, on A
        assert_pngs_equal_alone_runs(client, deployment.models[A], job_id, resolved(api, job_id))
    assert "abandoned job(s) retried" in deployment.janitor.logs()
    assert submit(api, model=A, width=64, height=64, steps=2)  # A is served again
    client.close()
