"""The CLI's pieces that need no server: progress lines, error messages, file names, request body."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest

from client.api import ApiError, ServiceClient, describe_error
from client.cli import output_paths, parse_args, request_body
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
