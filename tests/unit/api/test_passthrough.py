"""Tests for the header filter of agent passthrough, in both directions."""

from __future__ import annotations

import pytest

from services.api.passthrough import _NOT_FORWARDED, _NOT_RETURNED, _filtered

Headers = list[tuple[bytes, bytes]]


def names(headers: Headers) -> list[bytes]:
    return [name for name, _ in headers]


@pytest.mark.parametrize(
    "name",
    [
        b"Connection",
        b"Keep-Alive",
        b"Proxy-Authenticate",
        b"Proxy-Authorization",
        b"Proxy-Connection",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
        b"Host",
        b"Authorization",
        b"X-API-Key",
        b"x-api-key",
        b"AUTHORIZATION",
        b"Content-Length",
    ],
)
def test_request_header_dropped(name: bytes) -> None:
    headers = [(b"accept", b"*/*"), (name, b"value")]

    assert _filtered(headers, _NOT_FORWARDED) == [(b"accept", b"*/*")]


@pytest.mark.parametrize(
    "name",
    [b"Connection", b"Keep-Alive", b"Transfer-Encoding", b"Upgrade", b"X-Request-ID"],
)
def test_response_header_dropped(name: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (name, b"value")]

    assert _filtered(headers, _NOT_RETURNED) == [(b"content-type", b"text/plain")]


def test_response_keeps_content_length() -> None:
    headers = [(b"content-length", b"5")]

    assert _filtered(headers, _NOT_RETURNED) == headers


def test_headers_named_by_connection_dropped() -> None:
    headers = [
        (b"connection", b"close, X-Secret-Hop ,x-other"),
        (b"x-secret-hop", b"1"),
        (b"X-Other", b"2"),
        (b"x-kept", b"3"),
    ]

    assert _filtered(headers, _NOT_FORWARDED) == [(b"x-kept", b"3")]


def test_every_connection_header_read() -> None:
    headers = [
        (b"connection", b"x-first"),
        (b"x-first", b"1"),
        (b"x-second", b"2"),
        (b"Connection", b"x-second"),
    ]

    assert _filtered(headers, _NOT_FORWARDED) == []


def test_other_headers_kept_in_order() -> None:
    headers = [
        (b"Accept", b"application/json"),
        (b"X-Custom", b"1"),
        (b"Cookie", b"a=b"),
        (b"x-custom", b"2"),
        (b"Content-Type", b"application/json"),
    ]

    assert _filtered(headers, _NOT_FORWARDED) == headers


def test_values_kept_byte_for_byte() -> None:
    headers = [(b"x-binary", b"\xff\xfe caf\xe9")]

    assert _filtered(headers, _NOT_FORWARDED) == headers


def test_dropped_mixed_with_kept() -> None:
    headers = [
        (b"host", b"gateway:8080"),
        (b"accept", b"*/*"),
        (b"authorization", b"Bearer ar_secret"),
        (b"user-agent", b"curl"),
        (b"x-api-key", b"ar_secret"),
        (b"te", b"trailers"),
    ]

    assert names(_filtered(headers, _NOT_FORWARDED)) == [b"accept", b"user-agent"]
