"""The CLI's pieces that need no server: progress lines, error messages, file names and formats, request
body, the event stream (parsed, resumed after a cut, polling when there is none)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest

from client import cli
from client.api import ApiError, Event, ServiceClient, describe_error, parse_events
from client.cli import follow, output_paths, parse_args, request_body
from client.progress import ProgressLine, describe


def running(step: int, total: int = 10, **extra: object) -> dict:
    return {"status": "running", "progress": {"step": step, "total_steps": total}, **extra}


def test_describe_queue_position_and_steps() -> None:
    assert describe({"status": "queued", "queue_position": 0}) == "queued, next in line"
    assert describe({"status": "queued", "queue_position": 3}) == "queued, 3 job(s) ahead"
    assert describe(running(5)) == "running [" + "#" * 15 + "-" * 15 + "] step 5/10"
    assert describe(running(10, cancel_requested=True)).endswith("step 10/10 (canceling)")
    assert describe({"status": "succeeded"}) == "succeeded"


def test_progress_into_a_file_writes_a_line_per_change_and_per_tenth() -> None:
    stream = io.StringIO()
    line = ProgressLine(stream)
    for job in [{"status": "queued", "queue_position": 1}] * 3 + [running(s, 100) for s in range(0, 101)]:
        line.update(job)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "queued, 1 job(s) ahead"
    assert len(lines) == 1 + 11  # queued once, then steps 0, 10, ..., 100
    assert lines[-1].endswith("step 100/100")


def test_disabled_progress_writes_nothing() -> None:
    stream = io.StringIO()
    line = ProgressLine(stream, enabled=False)
    line.update(running(1))
    line.done()
    assert stream.getvalue() == ""


def test_server_messages() -> None:
    validation = httpx.Response(
        422, json={"detail": [{"loc": ["body", "steps"], "msg": "Input should be less than or equal to 150"}]}
    )
    message = describe_error(validation)
    assert message.startswith("422 ") and message.endswith(
        ": steps: Input should be less than or equal to 150"
    )
    assert (
        describe_error(httpx.Response(401, json={"detail": "invalid API key"}))
        == "401 Unauthorized: invalid API key"
    )
    openai_shape = httpx.Response(400, json={"error": {"message": "size: bad", "type": "x"}})
    assert describe_error(openai_shape) == "400 Bad Request: size: bad"
    assert describe_error(httpx.Response(502, text="<html>bad gateway</html>")).startswith(
        "502 Bad Gateway: <html>"
    )


def test_file_names_and_body() -> None:
    assert output_paths(Path("a/b.png"), 1) == [Path("a/b.png")]
    assert output_paths(Path("a/b.png"), 2) == [Path("a/b-0.png"), Path("a/b-1.png")]
    args = parse_args(["a cat", "--steps", "5", "--seed", "0", "--guidance-scale", "1"])
    assert request_body(args) == {"prompt": "a cat", "steps": 5, "seed": 0, "guidance_scale": 1.0}


def test_downloads_only_from_the_server_it_talks_to() -> None:
    """The API key goes with every request: an image URL pointing elsewhere is refused, not followed."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=b"png")

    client = ServiceClient("http://api.local", api_key="secret", transport=httpx.MockTransport(handler))
    assert client.download("/v1/jobs/x/images/0.png") == b"png"
    for url in ("http://evil.example/steal.png", "//evil.example/x.png", "v1/relative.png"):
        with pytest.raises(ApiError, match="refusing to download"):
            client.download(url)
    assert seen == ["http://api.local/v1/jobs/x/images/0.png"]


def test_output_format_from_the_file_name_or_the_option() -> None:
    args = parse_args(["a cat", "--out", "x.JPG", "--output-compression", "80"])
    assert (args.output_format, args.out) == ("jpeg", Path("x.JPG"))
    assert request_body(args) == {"prompt": "a cat", "output_format": "jpeg", "output_compression": 80}
    args = parse_args(["a cat", "--output-format", "webp"])
    assert (args.output_format, args.out) == ("webp", Path("image.webp"))
    assert output_paths(args.out, 2) == [Path("image-0.webp"), Path("image-1.webp")]
    assert request_body(parse_args(["a cat"])) == {"prompt": "a cat"}  # png: the server's default
    with pytest.raises(SystemExit):
        parse_args(["a cat", "--out", "x.webp", "--output-format", "png"])


def test_parse_events() -> None:
    lines = ["retry: 1000", "", ": keep-alive", "", "id: 0.1", "event: queued", 'data: {"status": "queued",',
             'data: "queue_position": 1}', "", "id: 2", "event: succeeded", 'data: {"status": "succeeded"}', ""]  # fmt: skip
    assert list(parse_events(lines)) == [
        None,
        Event("0.1", "queued", {"status": "queued", "queue_position": 1}),
        Event("2", "succeeded", {"status": "succeeded"}),
    ]


JOB = "ab" * 16


def event(event_id: str, name: str, **data: object) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n"


def step(n: int) -> str:
    return event(f"1.{n}", "progress", status="running", progress={"step": n, "total_steps": 3})


QUEUED = event("0.0", "queued", id=JOB, status="queued", queue_position=0)
DONE = event("2", "succeeded", id=JOB, status="succeeded", images=[])


def sse(*chunks: str, broken: bool = False) -> httpx.Response:
    """An event-stream answer; `broken`: the connection drops after the chunks (a proxy cut it)."""

    def body():
        for chunk in chunks:
            yield chunk.encode()
        if broken:
            raise httpx.ReadError("connection reset")

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


@pytest.fixture(autouse=True)
def reconnect_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "STREAM_RECONNECT_DELAY_S", 0.0)


def follow_with(handler) -> tuple[dict, list[httpx.Request], str]:
    requests: list[httpx.Request] = []

    def recording(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return handler(request, len([r for r in requests if r.url.path.endswith("/events")]))

    stderr = io.StringIO()
    with ServiceClient("http://api.local", transport=httpx.MockTransport(recording)) as client:
        job = follow(client, JOB, ProgressLine(stderr), timeout_s=None)
    return job, requests, stderr.getvalue()


def test_follow_listens_to_the_events_and_resumes_after_a_cut() -> None:
    def handler(request: httpx.Request, streams: int) -> httpx.Response:
        if streams == 1:
            return sse(QUEUED, step(1), broken=True)
        return sse(step(3), DONE)

    job, requests, progress = follow_with(handler)
    assert job["status"] == "succeeded"
    assert [r.url.path for r in requests] == [f"/v1/jobs/{JOB}/events"] * 2  # no poll
    assert "Last-Event-ID" not in requests[0].headers and requests[1].headers["Last-Event-ID"] == "1.1"
    assert progress.splitlines() == ["queued, next in line", "running [" + "#" * 10 + "-" * 20 + "] step 1/3",
                                     "running [" + "#" * 30 + "] step 3/3", "succeeded"]  # fmt: skip


@pytest.mark.parametrize(
    "events_answer",
    [
        lambda: httpx.Response(404, json={"detail": "Not Found"}),  # a server without events
        lambda: httpx.Response(200, headers={"content-type": "text/html"}, text="<html>"),  # a proxy page
        lambda: sse(QUEUED, broken=True),  # a stream that keeps breaking
    ],
)
def test_follow_falls_back_to_polling(events_answer) -> None:
    polls = iter([{"status": "running", "progress": {"step": 1, "total_steps": 3}}, {"status": "succeeded"}])

    def handler(request: httpx.Request, streams: int) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return events_answer()
        return httpx.Response(200, json=next(polls))

    job, requests, _ = follow_with(handler)
    assert job == {"status": "succeeded"}
    paths = [r.url.path for r in requests]
    assert paths.count(f"/v1/jobs/{JOB}") == 2 and paths[0].endswith("/events")
