"""The rules a webhook URL must pass (service/webhook_url.py) and the signature (service/webhooks.py),
without a server: well-formed http(s), allowed hosts, public addresses (SSRF), HMAC-SHA256."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress

import pytest

from service.webhook_url import WebhookRefused, check, check_sync, host_allowance, is_public, parse
from service.webhooks import backoff_s, sign


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.31.255.255", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast
        ("240.0.0.1", False),  # reserved
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo of 10.0.0.1
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


def test_allowed_hosts() -> None:
    assert host_allowance("hooks.example.com", ["hooks.example.com"]) == "explicit"
    assert host_allowance("a.b.example.com", ["*.example.com"]) == "explicit"
    assert host_allowance("example.com", ["*.example.com"]) is None  # the pattern means subdomains
    assert host_allowance("badexample.com", ["*.example.com"]) is None
    assert host_allowance("anything.org", ["*", "hooks.internal"]) == "public"
    assert host_allowance("hooks.internal", ["*", "hooks.internal"]) == "explicit"
    assert host_allowance("::1", ["0:0::1"]) == "explicit"  # the same IPv6 address, spelt otherwise
    assert host_allowance("other.org", ["hooks.example.com"]) is None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://h/x", "http:// or https://"),
        ("//h/x", "http:// or https://"),
        ("http:///x", "no host"),
        ("http://u:p@h/x", "user:password@"),
        ("http://h:99999/x", "not a valid URL"),
        ("http://h/a b", "white space"),
        ("http://h/" + "a" * 2048, "2048"),
    ],
)
def test_malformed_urls(url: str, words: str) -> None:
    with pytest.raises(WebhookRefused, match=words):
        parse(url)


def test_default_ports() -> None:
    assert parse("https://H.Example.com./x") == ("https", "h.example.com", 443)
    assert parse("http://[::1]:8080/x") == ("http", "::1", 8080)


def test_checks_resolve_and_refuse_private_addresses() -> None:
    assert check_sync("http://127.0.0.1:9/x", ["127.0.0.1"]).addresses == (ipaddress.ip_address("127.0.0.1"),)
    target = asyncio.run(check("http://localhost:9/x", ["localhost"]))
    assert target.allowance == "explicit" and all(not is_public(a) for a in target.addresses)
    for url in ("http://127.0.0.1/x", "http://localhost/x", "http://[::ffff:10.0.0.1]/x"):
        with pytest.raises(WebhookRefused, match="not a public address"):
            check_sync(url, ["*"])
        with pytest.raises(WebhookRefused, match="not a public address"):
            asyncio.run(check(url, ["*"]))
    with pytest.raises(WebhookRefused, match="webhooks are off"):
        check_sync("https://hooks.example.com/x", [])


def test_signature_and_backoff() -> None:
    body = b'{"id": "x"}'
    expected = hmac.new(b"s" * 16, b"1767268800." + body, hashlib.sha256).hexdigest()
    assert sign("s" * 16, 1767268800, body) == f"v1={expected}"
    assert [backoff_s(n) for n in (1, 2, 3, 6, 7, 20)] == [1, 2, 4, 32, 60, 60]
