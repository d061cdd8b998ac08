"""A job's `webhook_url`: the field (declared once), and the rules a URL must pass, at submission and
again before every delivery (service/webhooks.py).

- http or https, at most WEBHOOK_URL_MAX_CHARS, a host, no `user:password@` (put a token in the path
  or the query instead);
- its host allowed by SD_WEBHOOK_ALLOWED_HOSTS (empty: webhooks are off);
- SSRF: every address the host resolves to must be public, unless the host is named explicitly
  (a name, an IP or a `*.domain` pattern: an operator who lists `hooks.internal` means it). `*` lets
  in any host whose addresses are ALL public: never loopback, private, link-local (cloud metadata at
  169.254.169.254), carrier-grade NAT, multicast, reserved or unspecified, also when embedded in
  IPv6 (IPv4-mapped, 6to4, Teredo).

A delivery connects to one of the addresses checked here (not to the name again: a DNS answer that
changes between the check and the connection cannot smuggle a private address in), and follows no
redirect.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, StrictStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

WEBHOOK_URL_MAX_CHARS = 2048
SCHEMES = ("http", "https")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookRefused(ValueError):
    """The URL breaks a rule; the message says which, for the client (422) or the log."""


def _valid_url(value: str) -> str:
    try:
        parse(value)
    except WebhookRefused as error:
        raise PydanticCustomError("webhook_url", str(error)) from None
    return value


# The field as POST /v1/txt2img declares it (service/api_models.py); the deployment's rules (hosts,
# addresses) are checked when the job is submitted: `check_sync`.
WebhookUrl = Annotated[StrictStr, Field(max_length=WEBHOOK_URL_MAX_CHARS), AfterValidator(_valid_url)]


def _webhooks_off(value: object) -> None:
    if value is not None:
        raise PydanticCustomError("webhooks_off", WEBHOOKS_OFF)
    return None


WEBHOOKS_OFF = "webhooks are off on this server (SD_WEBHOOK_ALLOWED_HOSTS is empty)"


def webhook_url_field(enabled: bool) -> tuple[Any, FieldInfo]:
    """(annotation, field) of `webhook_url` for a request model (`create_model(..., webhook_url=...)`).
    Where webhooks are off, only null is valid (and the schema says so)."""
    description = (
        "When the job ends (succeeded, failed or canceled), POST its document (as GET /v1/jobs/{id}) to "
        "this http(s) URL, signed with HMAC-SHA256 (README: Webhooks), for the hosts the server allows "
        f"(SD_WEBHOOK_ALLOWED_HOSTS); at most {WEBHOOK_URL_MAX_CHARS} characters."
    )
    if not enabled:
        return Annotated[None, BeforeValidator(_webhooks_off)], Field(
            None, description=f"Null only: {WEBHOOKS_OFF}. {description}"
        )
    return WebhookUrl | None, Field(None, description=description, json_schema_extra={"format": "uri"})


@dataclass(frozen=True)
class Target:
    """Where a delivery goes: the URL's parts and the addresses its host resolved to, all checked."""

    url: str
    scheme: str
    host: str  # lower case, no brackets, no trailing dot
    port: int
    allowance: str  # host_allowance()
    addresses: tuple[IPAddress, ...]  # every one checked


def parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a well-formed webhook URL; WebhookRefused otherwise."""
    if len(url) > WEBHOOK_URL_MAX_CHARS:
        raise WebhookRefused(f"the URL is longer than {WEBHOOK_URL_MAX_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise WebhookRefused(f"not a valid URL: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise WebhookRefused(f"the URL must start with http:// or https:// (got {scheme or 'no'} scheme)")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("user:password@ is not supported in the URL: put a token in its path or query")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookRefused("the URL has no host")
    if any(ch.isspace() for ch in url):
        raise WebhookRefused("the URL contains white space")
    return scheme, host, port or (443 if scheme == "https" else 80)


def host_allowance(host: str, allowed_hosts: Sequence[str]) -> str | None:
    """How `host` is allowed: "explicit" (named, or under a `*.domain`: any address), "public" (only
    through `*`: public addresses only), or None (not allowed)."""
    literal = _ip(host)
    for entry in allowed_hosts:
        if entry == "*":
            continue
        if literal is not None and _ip(entry) == literal:
            return "explicit"
        if entry == host or (entry.startswith("*.") and host.endswith(entry[1:])):
            return "explicit"
    return "public" if "*" in allowed_hosts else None


def is_public(address: IPAddress) -> bool:
    """A globally routable unicast address, also looking inside IPv6 forms that embed an IPv4 one."""
    if isinstance(address, ipaddress.IPv6Address):
        for embedded in (address.ipv4_mapped, address.sixtofour, address.teredo and address.teredo[1]):
            if embedded is not None and not is_public(embedded):
                return False
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


def check_host(host: str, allowed_hosts: Sequence[str]) -> str:
    """The host's allowance (`host_allowance`), or WebhookRefused saying why."""
    if not allowed_hosts:
        raise WebhookRefused(WEBHOOKS_OFF)
    allowance = host_allowance(host, allowed_hosts)
    if allowance is None:
        raise WebhookRefused(
            f"host {host!r} is not one this server sends webhooks to (SD_WEBHOOK_ALLOWED_HOSTS)"
        )
    return allowance


def check_addresses(host: str, allowance: str, addresses: Sequence[IPAddress]) -> None:
    if not addresses:
        raise WebhookRefused(f"host {host!r} resolves to no address")
    if allowance == "explicit":
        return
    private = [str(a) for a in addresses if not is_public(a)]
    if private:
        what = f"{host} is" if _ip(host) is not None else f"host {host!r} resolves to {', '.join(private)}:"
        raise WebhookRefused(
            f"{what} not a public address (private, loopback, link-local or reserved); such hosts must "
            "be named in SD_WEBHOOK_ALLOWED_HOSTS"
        )


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _addresses(infos: list[tuple[Any, ...]]) -> tuple[IPAddress, ...]:
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone id
        if address not in found:
            found.append(address)
    return tuple(found)


def _checked(url: str, allowed_hosts: Sequence[str]) -> tuple[Target, IPAddress | None]:
    """The target before resolution (no addresses yet), and the host's address if it is an IP."""
    scheme, host, port = parse(url)
    allowance = check_host(host, allowed_hosts)
    return Target(url, scheme, host, port, allowance, ()), _ip(host)


def _resolved(target: Target, addresses: tuple[IPAddress, ...]) -> Target:
    check_addresses(target.host, target.allowance, addresses)
    return replace(target, addresses=addresses)


def _unresolvable(host: str, error: Exception) -> WebhookRefused:
    return WebhookRefused(f"host {host!r} cannot be resolved: {error}")


def check_sync(url: str, allowed_hosts: Sequence[str]) -> Target:
    """Every rule, resolving the host with the blocking resolver (from a thread-pool route); WebhookRefused."""
    target, literal = _checked(url, allowed_hosts)
    if literal is not None:
        return _resolved(target, (literal,))
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise _unresolvable(target.host, error) from None
    return _resolved(target, _addresses(infos))


async def check(url: str, allowed_hosts: Sequence[str]) -> Target:
    """Every rule, resolving the host without blocking the event loop; WebhookRefused."""
    target, literal = _checked(url, allowed_hosts)
    if literal is not None:
        return _resolved(target, (literal,))
    try:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise _unresolvable(target.host, error) from None
    return _resolved(target, _addresses(infos))
