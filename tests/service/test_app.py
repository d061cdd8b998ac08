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
