"""Live previews through a real API process and a real worker (tiny model): a job submitted with
`preview: true` shows a `preview_url` while it runs, serving a PNG of the latent's size; without it,
or once the job ended, there is none."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support.redis_server import RedisServer
from tests.support.service_stack import ServiceStack

ENDED = {"succeeded", "failed", "canceled"}


@pytest.fixture(scope="module")
def client(redis_server: RedisServer, random_models: dict[str, Path]) -> Iterator[httpx.Client]:
    if redis_server.proc is None:
        redis_server.start()
    with (
        ServiceStack(redis_server.url, random_models["sd1"]) as stack,
        httpx.Client(base_url=stack.url, timeout=10) as client,
    ):
        yield client


def follow(client: httpx.Client, job_id: str, timeout_s: float = 120) -> list[dict]:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        seen.append(job)
        if job["preview_url"]:
            preview = client.get(job["preview_url"])
            job["preview_png"] = preview.content if preview.status_code == 200 else None
        if job["status"] in ENDED:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s")


def submit(client: httpx.Client, **fields: object) -> str:
    body = {"prompt": "a red circle", "width": 96, "height": 64, "steps": 60, "seed": 1, **fields}
    answer = client.post("/v1/txt2img", json=body)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def test_preview_while_running(client: httpx.Client) -> None:
    job_id = submit(client, preview=True)
    seen = follow(client, job_id)
    with_preview = [job for job in seen if job["preview_url"]]
    assert with_preview, "no preview_url seen while the job ran"
    assert all(job["status"] == "running" for job in with_preview)
    assert with_preview[0]["preview_url"] == f"/v1/jobs/{job_id}/preview.png"
    pngs = [job["preview_png"] for job in with_preview if job.get("preview_png")]
    assert pngs, "preview_url never served a PNG"
    image = Image.open(io.BytesIO(pngs[0]))
    assert image.format == "PNG" and image.size == (12, 8)  # the latent: 1/8 of 96x64
    done = seen[-1]
    assert done["status"] == "succeeded" and done["preview_url"] is None
    assert all(job["warnings"] == [] for job in seen)  # a real checkpoint's stand-in: no vocabulary


def test_no_preview_unless_asked(client: httpx.Client) -> None:
    job_id = submit(client, steps=20)
    seen = follow(client, job_id)
    assert all(job["preview_url"] is None for job in seen)
    answer = client.get(f"/v1/jobs/{job_id}/preview.png")
    assert answer.status_code == 404 and "preview: true" in answer.json()["detail"]


def test_preview_must_be_a_boolean(client: httpx.Client) -> None:
    answer = client.post("/v1/txt2img", json={"prompt": "x", "preview": "yes"})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "preview"]
