"""Several models behind one API (service/model_routing.py), against real API processes with workers'
info published as their heartbeats publish it: which model a request runs on, each model's defaults,
limits, queue and queue limit, and the answers for a model that is unknown, unnamed or not live."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis

from schemas.queue import queue_name
from tests.support.api import client_for, module_api, publish_worker
from tests.support.api_process import ApiProcess
from tests.support.redis_server import RedisServer

LIMIT = 2  # SD_MAX_QUEUE_DEPTH: per model


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    yield from module_api(redis_server, SD_MAX_QUEUE_DEPTH=str(LIMIT), SD_WORKER_STALE_S="10")


@pytest.fixture
def served(rdb: redis.Redis) -> None:
    """alpha: two workers, 512x512, every sampler; beta: one worker, 768x640 in multiples of 64, two samplers."""
    publish_worker(rdb, name="alpha-0", model="alpha", native_width=512, native_height=512)
    publish_worker(rdb, name="alpha-1", model="alpha", native_width=512, native_height=512, age_s=1)
    publish_worker(
        rdb, name="beta-0", model="beta", native_width=768, native_height=640, size_multiple=64,
        default_steps=25, default_sampler="euler", samplers=["ddim", "euler"],
    )  # fmt: skip


@pytest.fixture
def client(api: ApiProcess, rdb: redis.Redis, served: None) -> Iterator[httpx.Client]:
    with client_for(api) as client:
        yield client


def post(client: httpx.Client, **fields: object) -> httpx.Response:
    return client.post("/v1/txt2img", json={"prompt": "a cat", **fields})


def request_of(client: httpx.Client, answer: httpx.Response) -> dict:
    assert answer.status_code == 202, answer.text
    return client.get(f"/v1/jobs/{answer.json()['id']}").json()["request"]


def error_at(answer: httpx.Response, field: str) -> str:
    assert answer.status_code == 422, answer.text
    return next(e["msg"] for e in answer.json()["detail"] if e["loc"] == ["body", field])


def test_each_request_runs_on_the_model_it_names_with_that_models_defaults(
    client: httpx.Client, rdb: redis.Redis
) -> None:
    alpha = request_of(client, post(client, model="alpha"))
    beta = request_of(client, post(client, model="beta"))
    assert (alpha["model"], alpha["width"], alpha["height"], alpha["steps"], alpha["sampler"]) == ("alpha", 512, 512, 50, "ddim")  # fmt: skip
    assert (beta["model"], beta["width"], beta["height"], beta["steps"], beta["sampler"]) == ("beta", 768, 640, 25, "euler")  # fmt: skip
    assert rdb.llen(f"rq:queue:{queue_name('alpha')}") == rdb.llen(f"rq:queue:{queue_name('beta')}") == 1


def test_several_models_and_none_named_is_a_422_naming_them(client: httpx.Client) -> None:
    message = error_at(post(client), "model")
    assert "send `model`, one of alpha, beta" in message and "SD_DEFAULT_MODEL" in message


def test_unknown_models_and_names_that_are_not_names(client: httpx.Client) -> None:
    assert (
        error_at(post(client, model="gamma"), "model") == "model 'gamma' is not served; served: alpha, beta"
    )
    for name in ("../alpha", "alpha/..", "a" * 65, "al pha", "alpha:1", ""):
        assert "no path characters" in error_at(post(client, model=name), "model"), name
    assert "valid string" in error_at(post(client, model=5), "model")


def test_the_chosen_models_limits(client: httpx.Client) -> None:
    assert "multiple of 64 for model beta" in error_at(post(client, model="beta", width=520), "width")
    message = error_at(post(client, model="beta", sampler="dpmpp_2m"), "sampler")
    assert message == "model beta does not run sampler dpmpp_2m: its samplers are ddim, euler"
    assert post(client, model="alpha", sampler="dpmpp_2m", width=520).status_code == 202


def test_the_queue_limit_is_per_model(client: httpx.Client) -> None:
    for _ in range(LIMIT):
        assert post(client, model="alpha").status_code == 202
    full = post(client, model="alpha")
    assert full.status_code == 429 and "queue is full for model alpha" in full.json()["detail"]
    assert post(client, model="beta").status_code == 202  # another model's queue has room


def test_a_known_model_without_a_live_worker_is_503_and_not_queued(
    client: httpx.Client, rdb: redis.Redis
) -> None:
    publish_worker(rdb, name="gamma-0", model="gamma", age_s=60)  # its worker stopped a minute ago
    answer = post(client, model="gamma")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "10"
    assert answer.json()["detail"] == (
        "model 'gamma' has no live worker now (stopped, restarting or still loading); retry in 10 s; "
        "served: alpha, beta"
    )
    assert rdb.llen(f"rq:queue:{queue_name('gamma')}") == 0
    assert (
        'sd_jobs_rejected_total{model="gamma",reason="model_unavailable"} 1.0' in client.get("/metrics").text
    )


def test_the_listing_names_every_served_model_with_its_workers(client: httpx.Client) -> None:
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert list(models) == ["alpha", "beta"]
    assert (models["alpha"]["workers"], models["beta"]["workers"]) == (2, 1)
    assert (models["beta"]["native_width"], models["beta"]["default_sampler"]) == (768, "euler")
    assert models["beta"]["samplers"] == ["ddim", "euler"] and "lcm" in models["alpha"]["samplers"]
    assert not models["alpha"]["default"] and not models["beta"]["default"]  # none: requests must name one
    assert client.get("/v1/models/beta").json()["workers"] == 1


def test_the_default_model_and_the_only_one(
    redis_server: RedisServer, rdb: redis.Redis, served: None
) -> None:
    with (
        ApiProcess({"REDIS_URL": redis_server.url, "SD_DEFAULT_MODEL": "beta"}) as with_default,
        client_for(with_default) as client,
    ):
        assert request_of(client, post(client))["model"] == "beta"
        assert request_of(client, post(client, model=None))["model"] == "beta"  # null: the default
        assert [m["id"] for m in client.get("/v1/models").json()["data"] if m["default"]] == ["beta"]
        rdb.delete("sd:worker:beta-0")  # beta's worker gone: the default model is not live
        answer = post(client)
        assert answer.status_code == 503 and "'beta' has no live worker" in answer.json()["detail"]
        assert request_of(client, post(client, model="alpha"))["model"] == "alpha"
    with ApiProcess({"REDIS_URL": redis_server.url}) as alone, client_for(alone) as client:
        assert request_of(client, post(client))["model"] == "alpha"  # the only one served now
        assert client.get("/v1/models").json()["data"][0]["default"] is True
