"""API keys against a real API process: 401 without or with a wrong key, 404 for another key's job."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.auth import Authenticator, owner_of
from tests.support import fake_worker
from tests.support.api import client_for, module_api
from tests.support.api_process import ApiProcess
from tests.support.redis_server import RedisServer

KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    yield from module_api(redis_server, SD_API_KEYS=f"{KEY_A}, {KEY_B}", SD_LOG_LEVEL="DEBUG")


@pytest.fixture
def alice(api: ApiProcess, redis_url: str) -> Iterator[httpx.Client]:
    fake_worker.serve(redis_url)  # jobs go to the fake model's queue
    with client_for(api, KEY_A) as client:
        yield client


@pytest.fixture
def bob(api: ApiProcess) -> Iterator[httpx.Client]:
    with client_for(api, KEY_B) as client:
        yield client


def submit(client: httpx.Client) -> str:
    response = client.post("/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 2})
    assert response.status_code == 202, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
def test_every_v1_route_needs_a_valid_key(api: ApiProcess, alice: httpx.Client, headers: dict) -> None:
    job_id = submit(alice)
    with httpx.Client(base_url=api.url, headers=headers) as anonymous:
        for response in (
            anonymous.post("/v1/txt2img", json={"prompt": "a cat"}),
            anonymous.post("/v1/txt2img", json={"steps": "not even valid"}),  # 401 before 422
            anonymous.get(f"/v1/jobs/{job_id}"),
            anonymous.get(f"/v1/jobs/{job_id}/images/0.png"),
            anonymous.delete(f"/v1/jobs/{job_id}"),
        ):
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["detail"]
    assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # the DELETE did nothing


def test_operational_routes_need_no_key(api: ApiProcess) -> None:
    assert httpx.get(api.url + "/healthz").status_code == 200
    assert httpx.get(api.url + "/metrics").status_code == 200
    assert httpx.get(api.url + "/openapi.json").status_code == 200


def test_another_keys_job_is_404(alice: httpx.Client, bob: httpx.Client, redis_url: str) -> None:
    job_id = submit(alice)
    fake_worker.run_queued_jobs(redis_url)
    assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert alice.get(f"/v1/jobs/{job_id}/images/0.png").status_code == 200
    for response in (
        bob.get(f"/v1/jobs/{job_id}"),
        bob.get(f"/v1/jobs/{job_id}/images/0.png"),
        bob.delete(f"/v1/jobs/{job_id}"),
    ):
        assert response.status_code == 404
        assert response.json()["detail"].startswith("job not found")


def test_another_key_cannot_cancel(alice: httpx.Client, bob: httpx.Client) -> None:
    job_id = submit(alice)
    assert bob.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    assert alice.delete(f"/v1/jobs/{job_id}").status_code == 200


def test_keys_never_reach_the_log(api: ApiProcess, alice: httpx.Client) -> None:
    submit(alice)
    httpx.get(api.url + "/v1/jobs/" + "0" * 32, headers={"Authorization": "Bearer leaked-secret"})
    logs = api.logs()
    assert "queued job" in logs  # the log is being written (DEBUG level)
    for secret in (KEY_A, KEY_B, "leaked-secret"):
        assert secret not in logs


def test_owner_is_a_digest_not_the_key() -> None:
    assert owner_of(KEY_A) != KEY_A and len(owner_of(KEY_A)) == 64
    assert not Authenticator([]).enabled
    assert Authenticator([]).owner(None) == ""
