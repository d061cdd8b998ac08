"""The app factory: one metrics registry per app, importing builds nothing, unexpected errors are JSON."""

from __future__ import annotations

import importlib
import subprocess
import sys

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import load_settings
from tests.support.api_process import REPO_ROOT


def test_importing_the_module_builds_no_app() -> None:
    module = importlib.import_module("service.app")
    assert "app" not in vars(module)  # built on first access only (uvicorn's getattr)


def test_each_app_has_its_own_metrics(redis_url: str) -> None:
    first = create_app(load_settings(redis_url=redis_url))
    second = create_app(load_settings(redis_url=redis_url))
    with TestClient(first) as a, TestClient(second) as b:
        a.get("/healthz")
        a.get("/healthz")
        b.get("/healthz")
        line = 'sd_http_requests_total{method="GET",route="/healthz",status="200"}'
        assert f"{line} 2.0" in a.get("/metrics").text
        assert f"{line} 1.0" in b.get("/metrics").text


def test_unexpected_errors_are_json_500_without_internals(redis_url: str) -> None:
    app = create_app(load_settings(redis_url=redis_url))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals /srv/app.py")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
        assert response.status_code == 500
        assert response.json() == {"detail": "internal server error (logged)"}
        assert "secret" not in response.text
        assert 'route="/boom",status="500"' in client.get("/metrics").text


def test_the_api_never_imports_torch_models_or_workers() -> None:
    """The API's docker image has no torch: building the app must not pull it in."""
    code = (
        "import sys; from service.app import create_app; from service.settings import load_settings; "
        "create_app(load_settings()); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'models', 'workers')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "[]"


def test_probes_and_polls_stay_out_of_the_access_log() -> None:
    import logging

    from service.app import QuietProbesAndPolls

    def record(method: str, path: str, status: int) -> logging.LogRecord:
        args = ("127.0.0.1:5000", method, path, "1.1", status)
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', args, None)

    quiet = QuietProbesAndPolls()
    job = "/v1/jobs/" + "a" * 32
    for method, path, status in [("GET", "/readyz", 503), ("GET", "/healthz", 200), ("GET", "/metrics", 200),
                                 ("GET", job, 200), ("GET", job + "/preview.png", 200),
                                 ("GET", job + "/events", 200), ("GET", "/sdapi/v1/progress", 200)]:  # fmt: skip
        assert not quiet.filter(record(method, path, status)), path
    for method, path, status in [("POST", "/v1/txt2img", 202), ("DELETE", job, 200), ("GET", job, 404),
                                 ("GET", job + "/images/0.png", 200), ("GET", "/", 200)]:  # fmt: skip
        assert quiet.filter(record(method, path, status)), (method, path, status)


def test_bodies_that_are_not_json_say_why(redis_url: str) -> None:
    app = create_app(load_settings(redis_url=redis_url))
    with TestClient(app) as client:
        broken = client.post(
            "/v1/txt2img", content=b'{"prompt": "x",}', headers={"content-type": "application/json"}
        )
        assert broken.status_code == 422
        assert broken.json()["detail"][0]["msg"].startswith(
            "the body is not valid JSON at character 15: Expecting"
        )
        plain = client.post("/v1/txt2img", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
        assert plain.status_code == 422
        assert "`Content-Type: application/json` (it was 'text/plain')" in plain.json()["detail"][0]["msg"]
        unsent = client.post("/v1/txt2img", content=b'{"prompt": "x"}')
        assert "(it is missing)" in unsent.json()["detail"][0]["msg"]
