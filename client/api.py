"""A small synchronous client of the service's HTTP API (/v1/txt2img, /v1/jobs/...), for the CLI.

Every failure is an `ApiError` whose message is the server's own (the 422 field errors, 401, 429 ...)
or says plainly why the server could not be reached.
"""

from __future__ import annotations

from typing import Any

import httpx


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


class ServiceClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
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

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}: status, queue position, progress, images, error."""
        return self._request("GET", f"/v1/jobs/{job_id}").json()

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
