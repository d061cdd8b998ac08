"""GET /v1/jobs/{id}/events against a real API process, the jobs run by real RQ with the stand-in job
function (tests/support/fake_worker.py): queued -> progress -> succeeded with the job document, the
stream's end, keep-alives, resuming with Last-Event-ID, a canceled job's end, API keys."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.support import fake_worker
from tests.support.api import client_for, module_api
from tests.support.api_process import ApiProcess
from tests.support.redis_server import RedisServer

KEY, OTHER_KEY = "events-key", "other-key"
STEP_S = 0.4  # each fake step takes this long: the stream (polling every 0.25 s) sees them


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    yield from module_api(redis_server, SD_API_KEYS=f"{KEY},{OTHER_KEY}", SD_EVENTS_KEEPALIVE_S="0.3")


@pytest.fixture
def client(api: ApiProcess, redis_url: str) -> Iterator[httpx.Client]:
    fake_worker.serve(redis_url)  # jobs go to the fake model's queue
    with client_for(api, KEY) as client:
        yield client


@pytest.fixture
def slow_steps() -> Iterator[None]:
    fake_worker.on_step = lambda job_id, step: time.sleep(STEP_S)
    yield
    fake_worker.on_step = None


@dataclass
class Stream:
    """What one connection to the events route received, read to its end in a thread."""

    status: int | None = None
    content_type: str = ""
    events: list[tuple[str | None, str, dict]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)

    def names(self) -> list[str]:
        return [name for _, name, _ in self.events]


def read_stream(client: httpx.Client, path: str, stream: Stream, headers: dict[str, str]) -> None:
    """A plain reading of the text/event-stream format (not the CLI's parser: this checks the wire)."""
    try:
        with client.stream("GET", path, headers=headers, timeout=httpx.Timeout(10, read=20)) as response:
            stream.status, stream.content_type = (
                response.status_code,
                response.headers.get("content-type", ""),
            )
            event_id, name, data = None, None, None
            for line in response.iter_lines():
                if line.startswith(":"):
                    stream.comments.append(line)
                elif line.startswith("retry: "):
                    stream.retry = line.removeprefix("retry: ")
                elif line.startswith("id: "):
                    event_id = line.removeprefix("id: ")
                elif line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = json.loads(line.removeprefix("data: "))
                elif line == "" and name is not None:
                    stream.events.append((event_id, name, data))
                    event_id, name, data = None, None, None
    finally:
        stream.ended.set()


def listen(client: httpx.Client, job_id: str, **headers: str) -> Stream:
    stream = Stream()
    path = f"/v1/jobs/{job_id}/events"
    threading.Thread(target=read_stream, args=(client, path, stream, headers), daemon=True).start()
    return stream


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def submit(client: httpx.Client, **fields: object) -> str:
    body = {"prompt": "a cat", "width": 64, "height": 64, "steps": 3, **fields}
    response = client.post("/v1/txt2img", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_queued_progress_succeeded_then_the_stream_ends(
    client: httpx.Client, redis_url: str, slow_steps: None
) -> None:
    job_id = submit(client, seed=3)
    stream = listen(client, job_id)
    wait_for(lambda: stream.events, what="the first event")
    assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
    event_id, name, data = stream.events[0]
    assert (event_id, name) == ("0.0", "queued")
    assert data["id"] == job_id and data["status"] == "queued" and data["queue_position"] == 0
    wait_for(lambda: stream.comments, what="a keep-alive while queued")  # SD_EVENTS_KEEPALIVE_S=0.3
    assert stream.comments[0] == ": keep-alive" and stream.retry == "1000"

    fake_worker.run_queued_jobs(redis_url)
    assert stream.ended.wait(10), "the stream did not end after the final event"

    names = stream.names()
    assert names[0] == "queued" and names[-1] == "succeeded"
    progress = [data for _, name, data in stream.events if name == "progress"]
    assert progress, f"no progress event: {names}"
    steps = [p["progress"]["step"] for p in progress]
    assert steps == sorted(set(steps)) and all(p["progress"]["total_steps"] == 3 for p in progress)
    assert all(p["status"] == "running" and p["preview_url"] is None for p in progress)
    ids = [event_id for event_id, _, _ in stream.events]
    assert ids == sorted(ids, key=lambda i: tuple(float(part) for part in i.split("."))) and ids[-1] == "2"
    final = stream.events[-1][2]
    assert final == client.get(f"/v1/jobs/{job_id}").json()  # the job document itself
    assert final["images"][0]["url"] == f"/v1/jobs/{job_id}/images/0.png"


def test_last_event_id_resumes_without_repeating(client: httpx.Client, redis_url: str) -> None:
    job_id = submit(client)
    resumed = listen(client, job_id, **{"Last-Event-ID": "0.0"})  # it saw "queued, next in line"
    wait_for(lambda: resumed.comments, what="a keep-alive")
    assert resumed.events == []  # nothing new
    fake_worker.run_queued_jobs(redis_url)
    assert resumed.ended.wait(10)
    assert resumed.names()[-1] == "succeeded" and "queued" not in resumed.names()

    after_step = listen(client, job_id, **{"Last-Event-ID": "1.2"})
    assert after_step.ended.wait(10)
    assert after_step.names() == ["succeeded"]

    # it saw the end: 204, which tells an EventSource to stop reconnecting
    answer = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "2"})
    assert answer.status_code == 204 and answer.content == b""


def test_a_canceled_job_ends_its_stream(client: httpx.Client) -> None:
    job_id = submit(client)
    stream = listen(client, job_id)
    wait_for(lambda: stream.events, what="the queued event")
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    assert stream.ended.wait(10)
    assert stream.names() == ["queued", "canceled"]
    final = stream.events[-1][2]
    assert final["status"] == "canceled" and final["cancel_requested"] is True and final["images"] == []


def test_another_keys_job_is_404_and_no_stream(api: ApiProcess, client: httpx.Client) -> None:
    job_id = submit(client)
    with client_for(api, OTHER_KEY) as other:
        answer = other.get(f"/v1/jobs/{job_id}/events")
        assert answer.status_code == 404 and answer.headers["content-type"] == "application/json"
        assert "another API key" in answer.json()["detail"]
    with client_for(api) as anonymous:
        assert anonymous.get(f"/v1/jobs/{job_id}/events").status_code == 401
    assert client.get("/v1/jobs/" + "0" * 32 + "/events").status_code == 404
    client.delete(f"/v1/jobs/{job_id}")


def test_a_stream_is_closed_after_sd_events_max_s(start_api, redis_url: str) -> None:
    """Without its end: the client resumes with Last-Event-ID (and is asked for its key again)."""
    api = start_api(SD_EVENTS_MAX_S="0.5")
    fake_worker.serve(redis_url)
    with client_for(api) as client:
        job_id = submit(client)
        started = time.monotonic()
        first = listen(client, job_id)
        assert first.ended.wait(10) and time.monotonic() - started < 5
        assert first.names() == ["queued"]
        resumed = listen(client, job_id, **{"Last-Event-ID": first.events[-1][0]})
        assert resumed.ended.wait(10) and resumed.status == 200 and resumed.events == []


def test_open_streams_do_not_hold_up_a_shutdown(start_api, redis_url: str) -> None:
    """SIGTERM: the server waits for open responses; a stream of a job that is still queued ends."""
    api = start_api()
    fake_worker.serve(redis_url)
    with client_for(api) as client:
        stream = listen(client, submit(client))
        wait_for(lambda: stream.events, what="the queued event")
        started = time.monotonic()
        api.stop()  # SIGTERM; SIGKILL after 10 s
        assert time.monotonic() - started < 5
        assert stream.ended.wait(5) and stream.names() == ["queued"]
