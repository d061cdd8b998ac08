"""GET/DELETE /v1/jobs/{id} and its images against a real API process, with jobs put in each state
by real RQ: a SimpleWorker (burst) runs them with a stand-in job function (tests/service/fake_worker.py).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest
import redis
from PIL import Image

from schemas.redis_keys import image_key
from tests.support import fake_worker
from tests.support.api import client_for, module_api
from tests.support.api_process import ApiProcess
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    yield from module_api(redis_server)


@pytest.fixture
def client(api: ApiProcess, redis_url: str) -> Iterator[httpx.Client]:
    fake_worker.serve(redis_url)  # jobs go to the fake model's queue
    with client_for(api) as client:
        yield client


@pytest.fixture
def on_step() -> Iterator[list]:
    """Collects (job_id, step) → whatever a test's hook returns; the hook is removed afterwards."""
    seen: list = []
    yield seen
    fake_worker.on_step = None


def submit(client: httpx.Client, **fields: object) -> str:
    response = client.post(
        "/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 3, **fields}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


@pytest.mark.parametrize("job_id", ["0" * 32, "f" * 32, "not-a-job", "rq:job:x", "A" * 32])
def test_unknown_job_is_404(client: httpx.Client, job_id: str) -> None:
    for response in (
        client.get(f"/v1/jobs/{job_id}"),
        client.delete(f"/v1/jobs/{job_id}"),
        client.get(f"/v1/jobs/{job_id}/images/0.png"),
    ):
        assert response.status_code == 404
        assert "not found" in response.json()["detail"]


def test_queued_job(client: httpx.Client) -> None:
    job = client.get(f"/v1/jobs/{submit(client, steps=7)}").json()
    assert job["status"] == "queued"
    assert job["queue_position"] == 0
    assert job["progress"] == {"step": 0, "total_steps": 7}
    assert job["images"] == [] and job["error"] is None and job["model"] is None
    assert job["created_at"] and job["started_at"] is None and job["finished_at"] is None


def test_running_then_succeeded(client: httpx.Client, redis_url: str, on_step: list) -> None:
    job_id = submit(client, seed=7, num_images=2)
    fake_worker.on_step = lambda jid, step: on_step.append(client.get(f"/v1/jobs/{jid}").json())
    fake_worker.run_queued_jobs(redis_url)

    assert [view["status"] for view in on_step] == ["running"] * 3
    assert [view["progress"] for view in on_step] == [{"step": s, "total_steps": 3} for s in (1, 2, 3)]
    assert on_step[0]["queue_position"] is None and on_step[0]["started_at"]

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["progress"] == {"step": 3, "total_steps": 3}
    assert job["model"] == fake_worker.FAKE_MODEL
    assert job["error"] is None
    assert job["images"] == [
        {"index": 0, "seed": 7, "url": f"/v1/jobs/{job_id}/images/0.png"},
        {"index": 1, "seed": 8, "url": f"/v1/jobs/{job_id}/images/1.png"},
    ]
    assert when(job["created_at"]) <= when(job["started_at"]) <= when(job["finished_at"])
    assert job["warnings"] == []  # a model that knows every word of the prompt


def test_warnings_while_running_and_in_the_result(
    client: httpx.Client, redis_url: str, on_step: list
) -> None:
    job_id = submit(client, prompt=f"{fake_worker.WARN_PREFIX} a photo of a cat")
    assert client.get(f"/v1/jobs/{job_id}").json()["warnings"] == []  # no worker has read it yet
    fake_worker.on_step = lambda jid, step: on_step.append(client.get(f"/v1/jobs/{jid}").json())
    fake_worker.run_queued_jobs(redis_url)
    assert [view["warnings"] for view in on_step] == [[fake_worker.FAKE_WARNING]] * 3  # as soon as known
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["warnings"] == [fake_worker.FAKE_WARNING]


def test_image_bytes_and_caching_headers(client: httpx.Client, redis_url: str) -> None:
    job_id = submit(client, width=96, height=64)
    fake_worker.run_queued_jobs(redis_url)

    response = client.get(f"/v1/jobs/{job_id}/images/0.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (96, 64)
    cache = response.headers["cache-control"]
    assert "immutable" in cache and "private" in cache
    max_age = int(cache.split("max-age=")[1].split(",")[0])
    assert 0 < max_age <= fake_worker.IMAGE_TTL_S
    etag = response.headers["etag"]

    again = client.get(f"/v1/jobs/{job_id}/images/0.png", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("index", ["1", "-1", "99"])
def test_image_index_out_of_range_is_404(client: httpx.Client, redis_url: str, index: str) -> None:
    job_id = submit(client)
    fake_worker.run_queued_jobs(redis_url)
    response = client.get(f"/v1/jobs/{job_id}/images/{index}.png")
    assert response.status_code == 404
    assert "no image" in response.json()["detail"]


def test_image_of_unfinished_job_is_404(client: httpx.Client) -> None:
    response = client.get(f"/v1/jobs/{submit(client)}/images/0.png")
    assert response.status_code == 404
    assert "queued" in response.json()["detail"]


def test_expired_image_is_404(client: httpx.Client, redis_url: str) -> None:
    job_id = submit(client)
    fake_worker.run_queued_jobs(redis_url)
    redis.Redis.from_url(redis_url).delete(image_key(job_id, 0))
    response = client.get(f"/v1/jobs/{job_id}/images/0.png")
    assert response.status_code == 404
    assert "expired" in response.json()["detail"]


def test_failed_job_reports_the_exception_not_the_traceback(client: httpx.Client, redis_url: str) -> None:
    job_id = submit(client, prompt=f"{fake_worker.FAIL_PREFIX} the prompt was rejected")
    fake_worker.run_queued_jobs(redis_url)  # fails, is retried once (SD_JOB_RETRIES=1), fails again
    response = client.get(f"/v1/jobs/{job_id}")
    job = response.json()
    assert job["status"] == "failed"
    assert job["error"] == {"type": "ValueError", "message": "the prompt was rejected"}
    assert job["images"] == [] and job["finished_at"]
    assert "Traceback" not in response.text and "File " not in response.text


def test_worker_error_in_meta_is_preferred(client: httpx.Client, redis_url: str) -> None:
    job_id = submit(client, prompt=f"{fake_worker.META_ERROR_PREFIX}prompt rejected by the safety checker")
    fake_worker.run_queued_jobs(redis_url)
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.json()["error"] == {
        "type": "PromptRejected",
        "message": "prompt rejected by the safety checker",
    }
    assert "internal detail" not in response.text


def test_cancel_queued_job_at_once(client: httpx.Client, redis_url: str) -> None:
    job_id = submit(client)
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    assert response.json()["queue_position"] is None
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert redis.Redis.from_url(redis_url).llen("rq:queue:txt2img") == 0

    fake_worker.run_queued_jobs(redis_url)  # nothing left to run
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    again = client.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 200 and again.json()["status"] == "canceled"


def test_cancel_running_job_stops_at_next_step(client: httpx.Client, redis_url: str, on_step: list) -> None:
    job_id = submit(client, steps=5)

    def cancel_at_step_2(jid: str, step: int) -> None:
        if step == 2:
            on_step.append(client.delete(f"/v1/jobs/{jid}"))

    fake_worker.on_step = cancel_at_step_2
    fake_worker.run_queued_jobs(redis_url)

    (during,) = on_step
    assert during.status_code == 202
    assert during.json()["status"] == "running" and during.json()["cancel_requested"] is True
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled"
    assert job["progress"] == {"step": 2, "total_steps": 5}
    assert job["error"] is None and job["images"] == []


def test_cancel_finished_job_is_409(client: httpx.Client, redis_url: str) -> None:
    job_id = submit(client)
    fake_worker.run_queued_jobs(redis_url)
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 409
    assert "already succeeded" in response.json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"


def test_wrong_method_lists_every_allowed_one(client: httpx.Client) -> None:
    response = client.put(f"/v1/jobs/{'0' * 32}")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"
    assert response.json() == {"detail": "Method Not Allowed"}
