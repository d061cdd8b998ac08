"""/healthz, /readyz, /metrics, /docs and /openapi.json on a real API process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import fake_worker
from tests.support.api import client_for, module_api, publish_worker
from tests.support.api_process import ApiProcess
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    yield from module_api(redis_server, SD_MAX_BODY_BYTES="2048", SD_WORKER_STALE_S="10")


@pytest.fixture
def client(api: ApiProcess, redis_url: str) -> Iterator[httpx.Client]:
    with client_for(api) as client:
        yield client


def samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_healthz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_needs_a_live_worker(client: httpx.Client, rdb) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "ready": False,
        "redis": True,
        "workers_alive": 0,
        "models": {},
        "detail": "no live worker (none with a heartbeat in the last 10 s)",
    }
    publish_worker(rdb, name="stale", age_s=60)
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["models"] == {"test-model": 0}  # known
    publish_worker(rdb, name="gpu-0")
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["workers_alive"] == 1 and response.json()["ready"] is True


def test_readyz_is_ready_with_one_live_model_and_names_the_others(client: httpx.Client, rdb) -> None:
    publish_worker(rdb, name="gpu-0")
    publish_worker(rdb, name="gpu-1")
    publish_worker(rdb, name="old-sdxl", model="sdxl", age_s=60)  # its worker died: known, not live
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["models"] == {"sdxl": 0, "test-model": 2}
    assert response.json()["detail"] == "ready; no live worker for model sdxl"


def test_metrics_queue_and_worker_gauges(client: httpx.Client, rdb) -> None:
    publish_worker(rdb, name="gpu-0", stats={"unet_calls": 10, "unet_rows": 60, "last_batch_rows": 4})
    for _ in range(3):
        assert client.post("/v1/txt2img", json={"prompt": "a cat"}).status_code == 202
    publish_worker(rdb, name="gpu-1", model="other")
    assert client.post("/v1/txt2img", json={"prompt": "a cat", "model": "other"}).status_code == 202
    values = samples(client)
    assert values[("sd_queue_depth", ())] == 4  # all models
    assert values[("sd_jobs_running", ())] == 0
    assert values[("sd_workers_alive", ())] == 2
    assert values[("sd_model_queue_depth", (("model", "test-model"),))] == 3
    assert values[("sd_model_queue_depth", (("model", "other"),))] == 1
    assert values[("sd_model_workers_alive", (("model", "other"),))] == 1
    assert values[("sd_model_jobs_running", (("model", "other"),))] == 0
    assert values[("sd_jobs_submitted_total", (("model", "test-model"),))] == 3
    gpu0 = (("model", "test-model"), ("worker", "gpu-0"))
    assert values[("sd_worker_unet_calls_total", gpu0)] == 10  # totals are counters
    assert values[("sd_worker_unet_rows_total", gpu0)] == 60
    assert values[("sd_worker_last_batch_rows", gpu0)] == 4
    assert values[("sd_worker_max_batch_rows", gpu0)] == 8
    assert values[("sd_worker_unet_calls_total", (("model", "other"), ("worker", "gpu-1")))] == 0
    assert values[("sd_worker_fast_path_fallback", gpu0)] == 0


def test_metrics_requests_by_route_template_and_status(client: httpx.Client) -> None:
    before = samples(client)
    client.get("/v1/jobs/" + "0" * 32)
    client.get("/v1/jobs/" + "1" * 32)
    client.post("/v1/txt2img", content=b"x" * 4096, headers={"Content-Type": "application/json"})  # 413
    client.get("/no/such/route")
    after = samples(client)

    def delta(method: str, route: str, status: str) -> float:
        key = ("sd_http_requests_total", (("method", method), ("route", route), ("status", status)))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("GET", "/v1/jobs/{job_id}", "404") == 2
    assert delta("POST", "/v1/txt2img", "413") == 1
    assert delta("GET", "unmatched", "404") == 1


def test_finished_jobs_are_counted_once(client: httpx.Client, redis_url: str) -> None:
    fake_worker.serve(redis_url)
    job_id = client.post("/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "num_images": 3}).json()["id"]  # fmt: skip
    fake_worker.run_queued_jobs(redis_url)
    before = samples(client)
    for _ in range(3):  # polled three times, counted once
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    after = samples(client)

    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("sd_jobs_finished_total", (("status", "succeeded"),)) == 1
    assert delta("sd_images_generated_total") == 3
    assert delta("sd_job_run_seconds_count", (("status", "succeeded"),)) == 1
    assert delta("sd_job_queue_wait_seconds_count") == 1


def test_docs_and_openapi_examples(client: httpx.Client) -> None:
    assert "swagger" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            ok = next(code for code in operation["responses"] if code.startswith("2"))
            content = operation["responses"][ok].get("content", {})
            has_example = any(
                "example" in media
                or "examples" in media
                or "examples" in _schema(spec, media.get("schema", {}))
                for media in content.values()
            )
            # image bytes: nothing to show as an example
            is_image = bool(content) and all(media.startswith("image/") for media in content)
            assert has_example or is_image, f"{method} {path}"
    body = spec["paths"]["/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]
    assert {"minimal", "full"} <= set(body["examples"])
    assert "0-based" in spec["info"]["description"]


def _schema(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema
