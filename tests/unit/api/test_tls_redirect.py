"""Tests for the redirect listener's ASGI app: where each request is sent, and nothing else."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from services.api.https_redirect import RedirectApp, public_origin

ORIGIN = "https://runner.example.com:8443"


def http_scope(
    path: str = "/",
    *,
    raw_path: bytes | None = None,
    query: bytes = b"",
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "query_string": query,
        "headers": headers or [(b"host", b"evil.example")],
        "client": ("198.51.100.7", 40000),
    }


async def call(app: RedirectApp, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("the redirect app must not read the request body")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        pytest.param("runner.example.com", 443, "https://runner.example.com", id="default-port"),
        pytest.param("runner.example.com", 8443, "https://runner.example.com:8443", id="port"),
        pytest.param("192.0.2.10", 8443, "https://192.0.2.10:8443", id="ipv4"),
    ],
)
def test_public_origin(host: str, port: int, expected: str) -> None:
    assert public_origin(host, port) == expected


@pytest.mark.parametrize(
    ("scope", "location"),
    [
        pytest.param(http_scope("/healthz"), f"{ORIGIN}/healthz", id="healthz"),
        pytest.param(
            http_scope("/v1/agents", query=b"state=ready&tail=5"),
            f"{ORIGIN}/v1/agents?state=ready&tail=5",
            id="query",
        ),
        pytest.param(http_scope("/v1/agents", method="POST"), f"{ORIGIN}/v1/agents", id="post"),
        pytest.param(
            http_scope("//evil.example/x"), f"{ORIGIN}//evil.example/x", id="double-slash"
        ),
        pytest.param(http_scope("/a\\b"), f"{ORIGIN}/a%5Cb", id="backslash"),
        pytest.param(
            http_scope("/café", raw_path="/café".encode()), f"{ORIGIN}/caf%C3%A9", id="utf-8"
        ),
        pytest.param(http_scope("/a b", raw_path=b"/a%20b"), f"{ORIGIN}/a%20b", id="escape-kept"),
        pytest.param(
            http_scope("/x", query=b"q=\r\nSet-Cookie: a"),
            f"{ORIGIN}/x?q=%0D%0ASet-Cookie:%20a",
            id="header-injection",
        ),
        pytest.param(http_scope("*", method="OPTIONS"), f"{ORIGIN}/", id="asterisk"),
        pytest.param(
            http_scope("/", headers=[(b"host", b"evil.example:80")]),
            f"{ORIGIN}/",
            id="host-header-ignored",
        ),
    ],
)
async def test_redirect_location(scope: dict[str, Any], location: str) -> None:
    sent = await call(RedirectApp(origin=ORIGIN), scope)

    assert sent[0]["status"] == 308
    assert dict(sent[0]["headers"])[b"location"] == location.encode()


async def test_redirect_sends_only_empty_response() -> None:
    sent = await call(RedirectApp(origin=ORIGIN), http_scope("/v1/agents", method="DELETE"))

    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sorted(dict(sent[0]["headers"])) == [b"content-length", b"location"]
    assert dict(sent[0]["headers"])[b"content-length"] == b"0"
    assert sent[1]["body"] == b""


async def test_redirect_ignores_non_http_scope() -> None:
    sent = await call(RedirectApp(origin=ORIGIN), {"type": "websocket", "path": "/"})

    assert sent == []


async def test_credentials_warning_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    app = RedirectApp(origin=ORIGIN)
    scope = http_scope("/v1/agents", headers=[(b"x-api-key", b"ar_secret_value")])

    with caplog.at_level(logging.WARNING, logger="services.api.https_redirect"):
        for _ in range(3):
            await call(app, scope)

    assert len(caplog.records) == 1
    assert caplog.records[0].__dict__["requests_since_last_warning"] == 1
    assert "198.51.100.7" in caplog.text
    assert "ar_secret_value" not in caplog.text


async def test_no_warning_without_credentials(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="services.api.https_redirect"):
        await call(RedirectApp(origin=ORIGIN), http_scope("/healthz"))

    assert caplog.records == []


async def test_credentials_warning_counts_suppressed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("services.api.https_redirect.time.monotonic", lambda: clock[0])
    app = RedirectApp(origin=ORIGIN)
    scope = http_scope("/v1/agents", headers=[(b"authorization", b"Bearer ar_secret_value")])

    with caplog.at_level(logging.WARNING, logger="services.api.https_redirect"):
        for _ in range(3):
            await call(app, scope)
        clock[0] += 61
        await call(app, scope)

    counts = [record.__dict__["requests_since_last_warning"] for record in caplog.records]
    assert counts == [1, 3]
    assert "ar_secret_value" not in caplog.text
