"""/docs works without the internet: every file the page loads is served by the app itself."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import load_settings

CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


class LoadedFiles(HTMLParser):
    """The URLs a browser fetches for the page: scripts, style sheets, icons."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = values.get("src") if tag == "script" else values.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


def files_of(html: str) -> list[str]:
    parser = LoadedFiles()
    parser.feed(html)
    return parser.urls


@pytest.fixture
def client(redis_url: str) -> Iterator[TestClient]:
    # API keys on: the docs, like /metrics and /healthz, must still load without one
    with TestClient(create_app(load_settings(redis_url=redis_url, api_keys="k1"))) as client:
        yield client


def test_docs_load_only_files_the_app_serves(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assert "://" not in page.text, "the page names another host"
    urls = files_of(page.text)
    assert {url.rsplit(".", 1)[-1] for url in urls} == {"js", "css", "png"}, urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), url
        answer = client.get(url)
        assert answer.status_code == 200, url
        assert len(answer.content) > 100, url
        assert CONTENT_TYPES["." + url.rsplit(".", 1)[-1]] in answer.headers["content-type"], url
    assert "'/openapi.json'" in page.text  # the schema comes from this app too
    assert client.get("/openapi.json").status_code == 200
    assert "/docs" not in client.get("/openapi.json").json()["paths"]


def test_redoc_which_needs_a_cdn_is_not_served(client: TestClient) -> None:
    assert client.get("/redoc").status_code == 404


def test_docs_behind_a_path_prefix_load_through_it(redis_url: str) -> None:
    app = create_app(load_settings(redis_url=redis_url))
    with TestClient(app, root_path="/sd") as client:
        page = client.get("/docs")
        assert page.status_code == 200
        urls = files_of(page.text)
        assert urls and all(url.startswith("/sd/docs/assets/") for url in urls), urls
        assert "'/sd/openapi.json'" in page.text
        assert all(client.get(url).status_code == 200 for url in urls)
