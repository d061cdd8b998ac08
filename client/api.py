"""A small synchronous client of the service's HTTP API (/v1/txt2img, /v1/img2img, /v1/jobs/...), for the CLI.

Every failure is an `ApiError` whose message is the server's own (the 422 field errors, 401, 429 ...)
or says plainly why the server could not be reached.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

EVENT_STREAM = "text/event-stream"


class ApiError(Exception):
    """The request failed; `str(error)` is the message for a person, `status` the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def describe_error(response: httpx.Response) -> str:
    """The server's message from an error answer: `{"detail": str | [{loc, msg}]}` or OpenAI's shape."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = ""
    if isinstance(body, dict):
        detail = body.get("detail")
        error = body.get("error")
        if isinstance(detail, str):
            message = detail
        elif isinstance(detail, list):
            message = "; ".join(_field_error(item) for item in detail)
        elif isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
    if not message:
        message = response.text.strip()[:300] or "no message"
    return f"{response.status_code} {response.reason_phrase}: {message}"


def _field_error(item: object) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = [str(part) for part in item.get("loc", []) if part != "body"]
    return f"{'.'.join(loc)}: {item.get('msg', 'invalid')}" if loc else str(item.get("msg", "invalid"))


@dataclass(frozen=True)
class Event:
    """One server-sent event: its id (to resume after it), its name and its JSON data."""

    id: str | None
    name: str
    data: dict[str, Any]


def parse_events(lines: Iterable[str]) -> Iterator[Event | None]:
    """Server-sent events from the stream's lines (the parts of the format the API uses: id, event,
    data, comments); None for each comment (a keep-alive), so that a caller can look at the time."""
    event_id: str | None = None
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                try:
                    payload = json.loads("\n".join(data))
                except ValueError:
                    payload = {"text": "\n".join(data)}
                yield Event(event_id, name, payload if isinstance(payload, dict) else {"value": payload})
            name, data = "message", []
            continue
        if line.startswith(":"):
            yield None
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "event":
            name = value
        elif field == "data":
            data.append(value)


class ServiceClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as error:
            raise ApiError(f"cannot reach the server at {self.base_url}: {error}") from None
        except httpx.TimeoutException:
            raise ApiError(
                f"the server at {self.base_url} did not answer in time ({method} {path})"
            ) from None
        except httpx.HTTPError as error:
            raise ApiError(f"{method} {self.base_url}{path} failed: {error}") from None
        if response.status_code >= 400:
            raise ApiError(describe_error(response), response.status_code)
        return response

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/txt2img: `{id, status, queue_position}`."""
        return self._request("POST", "/v1/txt2img", json=body).json()

    def submit_img2img(
        self, body: dict[str, Any], init_image: bytes, mask_image: bytes | None = None
    ) -> dict[str, Any]:
        """POST /v1/img2img as multipart/form-data: the body's fields (numbers spelled as in JSON) and the
        image files; `{id, status, queue_position}`."""
        data = {name: value if isinstance(value, str) else json.dumps(value) for name, value in body.items()}
        files = {"init_image": ("init_image", init_image)}
        if mask_image is not None:
            files["mask_image"] = ("mask_image", mask_image)
        return self._request("POST", "/v1/img2img", data=data, files=files).json()

    def models(self) -> list[dict[str, Any]]:
        """GET /v1/models: the served models (id, workers, native size, defaults, samplers...)."""
        return self._request("GET", "/v1/models").json()["data"]

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}: status, queue position, progress, images, error."""
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def events(
        self, job_id: str, last_event_id: str | None = None, read_timeout_s: float = 60.0
    ) -> Iterator[Event | None]:
        """GET /v1/jobs/{id}/events: the job's events as they come (None for a keep-alive) until the
        final one, after `last_event_id` when given. ApiError when the stream cannot be had (the
        server's error, a server without events, a proxy that answers something else), breaks, or is
        silent for `read_timeout_s` (the server sends a keep-alive every 15 s by default)."""
        headers = {"Accept": EVENT_STREAM}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        path = f"/v1/jobs/{job_id}/events"
        timeout = httpx.Timeout(self.timeout_s, read=read_timeout_s)
        try:
            with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code == 204:  # the final event was the last one seen: nothing more
                    return
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(describe_error(response), response.status_code)
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith(EVENT_STREAM):
                    raise ApiError(
                        f"GET {path} answered {content_type or 'no content type'}, not {EVENT_STREAM}"
                    )
                yield from parse_events(response.iter_lines())
        except httpx.TimeoutException:
            raise ApiError(f"the events of job {job_id} stopped for {read_timeout_s:g} s") from None
        except httpx.HTTPError as error:
            raise ApiError(f"the events of job {job_id} broke off: {error}") from None

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()

    def download(self, path: str) -> bytes:
        """The bytes at a path the API gave (image URLs are relative to its root).

        Only paths on this server: the API key goes with every request, so a URL pointing elsewhere
        (a misconfigured or hostile server) is refused rather than followed.
        """
        if not path.startswith("/") or path.startswith("//"):
            raise ApiError(f"refusing to download {path!r}: not a path on {self.base_url}")
        return self._request("GET", path).content
