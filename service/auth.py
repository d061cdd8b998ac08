"""Optional API keys: `Authorization: Bearer KEY` on every /v1 route when SD_API_KEYS is set.

AUTOMATIC1111's clients send HTTP Basic auth instead (`--api-auth user:password`): the /sdapi/v1
routes take the API key as the password, with any user name (`owner_of_header`).

A job belongs to the key that created it: its RQ meta holds `owner`, the SHA-256 of that key
(never the key itself), and every other key gets 404 for it. Keys are compared in constant time
(digests of equal length, every configured key checked) and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

from fastapi import HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# auto_error=False: a missing key is our 401 with our message, not FastAPI's 403.
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API key from SD_API_KEYS, as `Authorization: Bearer KEY`. Not needed when none is configured.",
)

NO_OWNER = ""  # owner of every job while authentication is off


def owner_of(key: str) -> str:
    """The owner id stored with a job: hex SHA-256 of its API key."""
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    def __init__(self, keys: Iterable[str]) -> None:
        self._owners = tuple(owner_of(key) for key in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._owners)

    def owner(self, credentials: HTTPAuthorizationCredentials | None) -> str:
        """The caller's owner id, NO_OWNER when auth is off, or a 401 HTTPException."""
        return self.owner_of_key(credentials.credentials if credentials is not None else None)

    def owner_of_header(self, authorization: str | None, challenge: str = "Bearer") -> str:
        """Like `owner`, from a raw `Authorization` header that may also be HTTP Basic with the key as
        password; a 401 carries `WWW-Authenticate: <challenge>`."""
        return self.owner_of_key(api_key_of(authorization), challenge)

    def owner_of_key(self, key: str | None, challenge: str = "Bearer") -> str:
        if not self._owners:
            return NO_OWNER
        if not key:
            raise _unauthorized(MISSING_KEY[challenge], challenge)
        candidate = owner_of(key)
        matched = False
        for known in self._owners:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(candidate, known)
        if not matched:
            raise _unauthorized("invalid API key", challenge)
        return candidate


MISSING_KEY = {
    "Bearer": "missing API key: send the header `Authorization: Bearer <key>`",
    "Basic": "missing API key: send HTTP Basic auth with the API key as password (any user name), or the "
    "header `Authorization: Bearer <key>`",
}


def api_key_of(authorization: str | None) -> str | None:
    """The API key an `Authorization` header carries: `Bearer KEY`, or `Basic base64(USER:KEY)` (any
    user name, as AUTOMATIC1111's `--api-auth` clients send it); None when it carries none."""
    scheme, _, param = (authorization or "").strip().partition(" ")
    param = param.strip()
    if scheme.lower() == "bearer":
        return param or None
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(param, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, colon, password = decoded.partition(":")
    return password if colon and password else None


def _unauthorized(detail: str, challenge: str = "Bearer") -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge})
