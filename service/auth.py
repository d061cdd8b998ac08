"""Optional API keys: `Authorization: Bearer KEY` on every /v1 route when SD_API_KEYS is set.

A job belongs to the key that created it: its RQ meta holds `owner`, the SHA-256 of that key
(never the key itself), and every other key gets 404 for it. Keys are compared in constant time
(digests of equal length, every configured key checked) and never logged.
"""

from __future__ import annotations

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
        if not self._owners:
            return NO_OWNER
        if credentials is None or not credentials.credentials:
            raise _unauthorized("missing API key: send the header `Authorization: Bearer <key>`")
        candidate = owner_of(credentials.credentials)
        matched = False
        for known in self._owners:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(candidate, known)
        if not matched:
            raise _unauthorized("invalid API key")
        return candidate


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})
