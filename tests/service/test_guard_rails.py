"""Queue limit (429, exact under concurrency), body limit (413) and Redis outages or a full Redis
(503, then recovery) on a real API process."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.support import fake_worker
from tests.support.redis_server import RedisServer

BODY_LIMIT = 4096


@pytest.fixture(autouse=True)
def fake_model(redis_url: str) -> None:
    fake_worker.serve(redis_url)  # jobs go to the fake model's queue


def test_queue_full_is_429_with_retry_after(start_api) -> None:
    api = start_api(SD_MAX_QUEUE_DEPTH="2", SD_RETRY_AFTER_S="7")
    with httpx.Client(base_url=api.url) as client:
        for _ in range(2):
            assert client.post("/v1/txt2img", json={"prompt": "a cat"}).status_code == 202
        response = client.post("/v1/txt2img", json={"prompt": "a cat"})
        assert response.status_code == 429
        assert response.headers["retry-after"] == "7"
        assert "queue is full" in response.json()["detail"]
        assert "sd_queue_depth 2.0" in client.get("/metrics").text
        assert 'sd_model_queue_depth{model="fake-model"} 2.0' in client.get("/metrics").text


def test_queue_space_returns_after_cancel(start_api) -> None:
    api = start_api(SD_MAX_QUEUE_DEPTH="1")
    with httpx.Client(base_url=api.url) as client:
        job_id = client.post("/v1/txt2img", json={"prompt": "a cat"}).json()["id"]
        assert client.post("/v1/txt2img", json={"prompt": "a cat"}).status_code == 429
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
        assert client.post("/v1/txt2img", json={"prompt": "a cat"}).status_code == 202


@pytest.fixture
def small_body_api(start_api):
    return start_api(SD_MAX_BODY_BYTES=str(BODY_LIMIT))


def body_of_size(size: int) -> bytes:
    """A valid-JSON request body of exactly `size` bytes (the padding is an over-long prompt)."""
    skeleton = json.dumps({"prompt": ""}).encode()
    return json.dumps({"prompt": "a" * (size - len(skeleton))}).encode()


def test_body_over_the_limit_is_413(small_body_api) -> None:
    with httpx.Client(base_url=small_body_api.url) as client:
        response = client.post("/v1/txt2img", content=body_of_size(BODY_LIMIT + 1), headers={"Content-Type": "application/json"})  # fmt: skip
        assert response.status_code == 413
        assert f"at most {BODY_LIMIT} bytes" in response.json()["detail"]
        # At the limit the body is read and validated (the prompt is then too long: 422, not 413).
        at_limit = client.post("/v1/txt2img", content=body_of_size(BODY_LIMIT), headers={"Content-Type": "application/json"})  # fmt: skip
        assert at_limit.status_code == 422
        assert at_limit.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_chunked_body_without_content_length_is_413(small_body_api) -> None:
    def chunks():
        for _ in range(8):
            yield b"x" * 1024

    with httpx.Client(base_url=small_body_api.url) as client:
        response = client.post("/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"

        def small_chunks():
            yield b'{"prompt": '
            yield b'"a cat"}'

        ok = client.post("/v1/txt2img", content=small_chunks(), headers={"Content-Type": "application/json"})
        assert ok.status_code == 202, ok.text


def test_redis_down_is_503_and_the_api_recovers(start_api, redis_server: RedisServer) -> None:
    api = start_api()
    with httpx.Client(base_url=api.url, timeout=15) as client:
        job_id = client.post("/v1/txt2img", json={"prompt": "a cat"}).json()["id"]
        redis_server.stop()
        try:
            for response in (
                client.post("/v1/txt2img", json={"prompt": "a cat"}),
                client.get(f"/v1/jobs/{job_id}"),
                client.get(f"/v1/jobs/{job_id}/images/0.png"),
                client.delete(f"/v1/jobs/{job_id}"),
            ):
                assert response.status_code == 503, response.text
                assert "Redis" in response.json()["detail"]
                assert "retry-after" in response.headers
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] is False
            assert client.get("/healthz").status_code == 200
            metrics = client.get("/metrics")
            assert metrics.status_code == 200 and "sd_redis_up 0.0" in metrics.text
        finally:
            redis_server.start()  # same port, empty: the old job is gone
            fake_worker.serve(redis_server.url)  # and the worker's heartbeat with it
        # Same process, no restart: pooled connections that died with Redis are replaced.
        assert client.post("/v1/txt2img", json={"prompt": "a cat"}).status_code == 202
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert "sd_redis_up 1.0" in client.get("/metrics").text
    assert "Traceback" not in api.logs()


def test_the_queue_limit_holds_exactly_under_concurrent_posts(start_api, rdb) -> None:
    """20 clients post at once: the depth check and the enqueue are one step, so exactly the limit
    is accepted (before, check-then-enqueue let 102-110 jobs in under a limit of 100)."""
    limit, clients, posts_each = 30, 20, 4
    api = start_api(SD_MAX_QUEUE_DEPTH=str(limit))
    barrier = threading.Barrier(clients)
    codes: list[int] = []
    lock = threading.Lock()

    def post_many() -> None:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            barrier.wait()
            for _ in range(posts_each):
                code = client.post("/v1/txt2img", json={"prompt": "a cat"}).status_code
                with lock:
                    codes.append(code)

    threads = [threading.Thread(target=post_many) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(set(codes)) == [202, 429], codes
    assert codes.count(202) == limit
    assert rdb.llen(fake_worker.queue_key()) == limit


def test_a_full_redis_is_503_and_loses_nothing_accepted(start_api, rdb) -> None:
    """Redis at maxmemory with noeviction refuses writes: a POST answers 503 (nothing half-queued),
    reads still work, and jobs accepted before are all still there once it has room again."""
    api = start_api()
    with httpx.Client(base_url=api.url, timeout=15) as client:
        accepted = [client.post("/v1/txt2img", json={"prompt": "a cat"}).json()["id"] for _ in range(3)]
        rdb.config_set("maxmemory", 1)  # any write now exceeds it
        try:
            refused = client.post("/v1/txt2img", json={"prompt": "a cat"})
            assert refused.status_code == 503, refused.text
            assert "full" in refused.json()["detail"] and "retry-after" in refused.headers
            assert client.get(f"/v1/jobs/{accepted[0]}").json()["status"] == "queued"
        finally:
            rdb.config_set("maxmemory", 0)
        assert rdb.llen(fake_worker.queue_key()) == 3
        positions = [client.get(f"/v1/jobs/{job_id}").json()["queue_position"] for job_id in accepted]
        assert positions == [0, 1, 2]
        assert client.post("/v1/txt2img", json={"prompt": "a cat"}).status_code == 202
    assert "Traceback" not in api.logs()
