"""GET /v1/samplers, and the model's recommended sampler as the default of a request."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi.testclient import TestClient

from schemas.redis_keys import WORKERS_ZSET, worker_info_key
from schemas.samplers import SAMPLERS
from service.app import create_app
from service.settings import load_settings
from tests.support.api import publish_worker


def test_every_sampler_with_its_names_schedules_and_traits(redis_url: str) -> None:
    with TestClient(create_app(load_settings(redis_url=redis_url, api_keys="k"))) as client:
        assert client.get("/v1/samplers").status_code == 401  # behind the same keys
        listing = client.get("/v1/samplers", headers={"Authorization": "Bearer k"}).json()
    by_name = {sampler["name"]: sampler for sampler in listing["samplers"]}
    assert list(by_name) == list(SAMPLERS)
    assert by_name["dpmpp_2m"]["label"] == "DPM++ 2M"
    assert "DPM++ 2M Karras" in by_name["dpmpp_2m"]["aliases"]
    assert by_name["ddim"]["schedulers"] == ["normal", "sgm_uniform"] and by_name["ddim"]["uses_eta"]
    assert by_name["lcm"]["lcm_model"] and by_name["euler_ancestral"]["stochastic"]
    assert [s["name"] for s in listing["schedulers"]] == ["normal", "karras", "exponential", "sgm_uniform"]


@contextlib.contextmanager
def forget_workers(rdb) -> Iterator[None]:
    """The published worker must not outlive the test: other modules' APIs share this Redis."""
    try:
        yield
    finally:
        rdb.delete(WORKERS_ZSET, worker_info_key("gpu-0"))


def test_a_request_gets_the_models_recommended_sampler_unless_it_names_one(redis_url: str, rdb) -> None:
    publish_worker(rdb, default_sampler="dpmpp_2m", default_scheduler="karras")
    with TestClient(create_app(load_settings(redis_url=redis_url))) as client, forget_workers(rdb):

        def resolved(**fields: object) -> dict:
            job_id = client.post("/v1/txt2img", json={"prompt": "a cat", **fields}).json()["id"]
            return client.get(f"/v1/jobs/{job_id}").json()["request"]

        assert (resolved()["sampler"], resolved()["scheduler"]) == ("dpmpp_2m", "karras")
        named = resolved(sampler="Euler a")
        assert (named["sampler"], named["scheduler"]) == ("euler_ancestral", "normal")  # karras: not for it
        assert resolved(sampler="euler")["scheduler"] == "karras"  # the recommendation, which it can follow
        model = client.get("/v1/models").json()["data"][0]
        assert (model["default_sampler"], model["default_scheduler"]) == ("dpmpp_2m", "karras")
        refused = client.post(
            "/v1/txt2img", json={"prompt": "a cat", "sampler": "ddim", "scheduler": "karras"}
        )
        assert refused.status_code == 422 and "it supports: normal, sgm_uniform" in refused.text
