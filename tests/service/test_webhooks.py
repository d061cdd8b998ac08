"""Webhooks through real API processes, the jobs run by real RQ with the stand-in job function
(tests/support/fake_worker.py), delivered to a receiver on loopback started here: signed as the README
says (its verification snippet is run), retried after a 500 and a redirect (never followed), given up
after SD_WEBHOOK_RETRY_FOR_S, exactly once with two API processes, surviving a restart of the API;
refused URLs (422): webhooks off, not http(s), too long, host not allowed, private addresses."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis

from schemas.redis_keys import WEBHOOKS_PENDING_ZSET
from service.settings import ConfigurationError, load_settings
from tests.support import fake_worker
from tests.support.api_process import REPO_ROOT, ApiProcess

SECRET = "test-webhook-secret-0123456789"
WEBHOOKS_ON = {"SD_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "SD_WEBHOOK_SECRET": SECRET}


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """An HTTP server on loopback that records every POST and answers, per path, the statuses of
    `script` in turn (then 200)."""

    script: dict[str, list[int]] = field(default_factory=dict)
    received: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.received.append(Delivery(self.path, dict(self.headers), body, time.time()))
                    statuses = receiver.script.get(self.path, [])
                    status = statuses.pop(0) if statuses else 200
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", "/redirected")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def to(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.received if d.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.server.shutdown()


def readme_verify() -> Callable[..., bool]:
    """The README's verification snippet, run as written."""
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"```python\n(# Verify an sdserve webhook.*?)```", readme, re.S)
    assert match, "README.md has no webhook verification snippet"
    namespace: dict = {}
    exec(match[1], namespace)  # noqa: S102 (our own README)
    return namespace["verify_webhook"]


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def submit(api: ApiProcess, **fields: object) -> httpx.Response:
    body = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, **fields}
    return httpx.post(api.url + "/v1/txt2img", json=body, timeout=10)


def submitted(api: ApiProcess, url: str) -> str:
    answer = submit(api, webhook_url=url)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def test_signed_retried_never_redirected_then_given_up(
    start_api: Callable[..., ApiProcess], receiver: Receiver, redis_url: str, rdb: redis.Redis
) -> None:
    api = start_api(**WEBHOOKS_ON, SD_WEBHOOK_RETRY_FOR_S="4")
    fake_worker.serve(redis_url)  # jobs go to the fake model's queue
    receiver.script = {"/flaky": [500, 302], "/down": [500] * 10}
    flaky = submitted(api, receiver.url("/flaky"))
    down = submitted(api, receiver.url("/down"))
    job = httpx.get(f"{api.url}/v1/jobs/{flaky}").json()
    assert "webhook_url" not in job["request"]  # a delivery option, not part of the picture
    not_listed = submit(api, webhook_url=receiver.url("/x").replace("127.0.0.1", "localhost"))
    assert not_listed.status_code == 422 and "not one this server sends webhooks to" in not_listed.text
    fake_worker.run_queued_jobs(redis_url)

    wait_for(lambda: len(receiver.to("/flaky")) == 3, 15, "a 500, a redirect, then a success")
    attempts = receiver.to("/flaky")
    assert [d.headers["Sd-Webhook-Attempt"] for d in attempts] == ["1", "2", "3"]
    gaps_s = [later.at - earlier.at for earlier, later in zip(attempts, attempts[1:], strict=False)]
    assert gaps_s[0] >= 0.9 and gaps_s[1] >= 1.9  # backoff 1 s, then 2 s
    assert receiver.to("/redirected") == []  # never followed
    verify = readme_verify()
    document = httpx.get(f"{api.url}/v1/jobs/{flaky}").json()
    for delivery in attempts:
        assert delivery.headers["Sd-Webhook-Id"] == flaky
        assert delivery.headers["Content-Type"] == "application/json"
        assert verify(SECRET, delivery.headers, delivery.body)
        assert not verify("another-secret-0123456789", delivery.headers, delivery.body)
        assert not verify(SECRET, delivery.headers, delivery.body + b" ")
        assert json.loads(delivery.body) == document  # the job document, as GET answers it
    assert document["status"] == "succeeded"

    # /down answers 500 each time: tried at 0, 1 and 3 s; the next try (7 s) is past 4 s: dropped
    wait_for(lambda: rdb.zscore(WEBHOOKS_PENDING_ZSET, down) is None, 15, "the failing webhook dropped")
    assert len(receiver.to("/down")) == 3
    assert f"webhook of job {down} dropped after 3 attempts" in api.logs()
    time.sleep(1.2)
    assert len(receiver.to("/flaky")) == 3 and len(receiver.to("/down")) == 3


def test_exactly_once_across_two_api_processes_and_a_restart(
    start_api: Callable[..., ApiProcess], receiver: Receiver, redis_url: str, rdb: redis.Redis
) -> None:
    first, second = start_api(**WEBHOOKS_ON), start_api(**WEBHOOKS_ON)
    fake_worker.serve(redis_url)  # jobs go to the fake model's queue
    jobs = [submitted(api, receiver.url(f"/job{i}")) for i, api in enumerate([first, second] * 4)]
    canceled = submitted(first, receiver.url("/canceled"))
    assert httpx.delete(f"{second.url}/v1/jobs/{canceled}").status_code == 200
    fake_worker.run_queued_jobs(redis_url)
    wait_for(lambda: len(receiver.received) == len(jobs) + 1, 15, "every webhook")
    time.sleep(1.5)  # several sweeps of both processes later
    ids = [d.headers["Sd-Webhook-Id"] for d in receiver.received]
    assert sorted(ids) == sorted([*jobs, canceled])  # each exactly once
    assert json.loads(receiver.to("/canceled")[0].body)["status"] == "canceled"
    assert rdb.zcard(WEBHOOKS_PENDING_ZSET) == 0

    # a job that ends while no API process runs is delivered when one starts again
    late = submitted(first, receiver.url("/late"))
    first.stop()
    second.stop()
    fake_worker.run_queued_jobs(redis_url)
    assert receiver.to("/late") == []
    first.start()
    wait_for(lambda: receiver.to("/late"), 15, "the webhook after the restart")
    assert receiver.to("/late")[0].headers["Sd-Webhook-Id"] == late


def test_refused_urls_are_422(start_api: Callable[..., ApiProcess], receiver: Receiver) -> None:
    off = start_api()
    answer = submit(off, webhook_url=receiver.url("/x"))
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "webhook_url"]
    assert "webhooks are off" in answer.json()["detail"][0]["msg"]

    public_only = start_api(SD_WEBHOOK_ALLOWED_HOSTS="*,hooks.invalid", SD_WEBHOOK_SECRET=SECRET)
    refused = {
        "ftp://127.0.0.1/x": "http:// or https://",
        "http://127.0.0.1/" + "a" * 2100: "2048",
        "http://user:pw@hooks.invalid/x": "user:password@",
        "http://127.0.0.1:9/x": "not a public address",
        "http://[::1]/x": "not a public address",
        "http://10.1.2.3/x": "not a public address",
        "http://169.254.169.254/latest/meta-data": "not a public address",
        "http://[::ffff:192.168.0.1]/x": "not a public address",
        "http://localhost/x": "resolves to",
        "http://no-such-host.invalid/x": "cannot be resolved",
    }
    for url, words in refused.items():
        answer = submit(public_only, webhook_url=url)
        assert answer.status_code == 422, (url, answer.text)
        detail = answer.json()["detail"][0]
        assert detail["loc"] == ["body", "webhook_url"] and words in detail["msg"], (url, detail)
    wrong_type = submit(public_only, webhook_url=42)
    assert wrong_type.status_code == 422 and wrong_type.json()["detail"][0]["loc"] == ["body", "webhook_url"]


def test_the_settings_refuse_webhooks_without_a_secret() -> None:
    with pytest.raises(ConfigurationError, match="SD_WEBHOOK_SECRET must hold at least 16"):
        load_settings(webhook_allowed_hosts="*", webhook_secret="short")
    with pytest.raises(ConfigurationError, match="SD_WEBHOOK_ALLOWED_HOSTS: 'https://x'"):
        load_settings(webhook_allowed_hosts="https://x", webhook_secret=SECRET)
