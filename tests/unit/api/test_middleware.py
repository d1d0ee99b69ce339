"""Tests for RequestIdMiddleware and BodyLimitMiddleware."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from services.api.middleware import RequestIdMiddleware
from tests.unit.api.conftest import CONTROL_LIMIT, PASSTHROUGH_LIMIT

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def chunks(total: int, size: int = 30) -> Iterator[bytes]:
    """Yield `total` bytes in chunks, so the client sends them without Content-Length."""
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


@pytest.mark.parametrize(
    "request_id",
    ["abc-1", "01HZX3K6J4Q9", "trace:span.1_2", "x" * 128],
)
def test_safe_request_id_echoed(client: TestClient, request_id: str) -> None:
    response = client.get("/request-id", headers={"X-Request-ID": request_id})

    assert response.headers["x-request-id"] == request_id
    assert response.json() == {"request_id": request_id}


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param("has space", id="space"),
        pytest.param("x" * 200, id="200-characters"),
        pytest.param("x" * 129, id="129-characters"),
        pytest.param("a\x01b", id="control-character"),
        pytest.param("a\tb", id="tab"),
        pytest.param("<script>", id="markup"),
        pytest.param("a/b", id="slash"),
        pytest.param("", id="empty"),
    ],
)
def test_unsafe_request_id_replaced(client: TestClient, request_id: str) -> None:
    response = client.get("/request-id", headers={"X-Request-ID": request_id})

    assert GENERATED_ID.fullmatch(response.headers["x-request-id"])
    assert response.json() == {"request_id": response.headers["x-request-id"]}


def test_missing_request_id_generated(client: TestClient) -> None:
    response = client.get("/request-id")

    assert GENERATED_ID.fullmatch(response.headers["x-request-id"])


def test_generated_ids_differ(client: TestClient) -> None:
    first = client.get("/request-id").headers["x-request-id"]
    second = client.get("/request-id").headers["x-request-id"]

    assert first != second


def test_response_has_one_request_id(client: TestClient) -> None:
    response = client.get("/request-id", headers={"X-Request-ID": "abc-1"})

    assert response.headers.get_list("x-request-id") == ["abc-1"]


async def test_request_id_with_trailing_newline_replaced() -> None:
    # HTTP clients cannot send a newline in a header, so the ASGI app is called directly; a
    # `$`-anchored pattern would accept this value.
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = RequestIdMiddleware(app)
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(b"x-request-id", b"abc\n")],
    }
    await middleware(scope, receive, send)

    headers = dict(sent[0]["headers"])
    assert GENERATED_ID.fullmatch(headers[b"x-request-id"].decode())


def test_body_at_limit_accepted(client: TestClient) -> None:
    response = client.post("/echo", content=b"x" * CONTROL_LIMIT)

    assert response.status_code == 200
    assert response.json() == {"received": CONTROL_LIMIT}


def test_streamed_body_at_limit_accepted(client: TestClient) -> None:
    response = client.post("/echo", content=chunks(CONTROL_LIMIT))

    assert response.status_code == 200
    assert response.json() == {"received": CONTROL_LIMIT}


def test_body_over_limit_by_content_length(client: TestClient) -> None:
    response = client.post(
        "/echo", content=b"x" * (CONTROL_LIMIT + 1), headers={"X-Request-ID": "big-1"}
    )

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert response.json()["request_id"] == "big-1"
    assert response.headers["x-request-id"] == "big-1"


def test_body_over_limit_by_stream(client: TestClient) -> None:
    response = client.post("/echo", content=chunks(CONTROL_LIMIT * 3))

    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_model_body_over_limit_by_stream(client: TestClient) -> None:
    # FastAPI parses a model body itself and turns most errors while reading into a 400.
    body = b'{"text": "' + b"x" * CONTROL_LIMIT + b'"}'

    response = client.post(
        "/model", content=iter([body[:50], body[50:]]), headers={"content-type": "application/json"}
    )

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_model_body_within_limit_parsed(client: TestClient) -> None:
    response = client.post("/model", json={"text": "hello"})

    assert response.status_code == 200
    assert response.json() == {"received": 5}


def test_content_length_checked_before_route(client: TestClient) -> None:
    # A declared length over the limit gets 413 before routing and before any body is read.
    response = client.post("/nowhere", content=b"x" * (CONTROL_LIMIT + 1))

    assert response.status_code == 413


def test_passthrough_route_has_own_limit(client: TestClient) -> None:
    response = client.post("/v1/agents/ag-1/http/upload", content=b"x" * PASSTHROUGH_LIMIT)

    assert response.status_code == 200
    assert response.json() == {"received": PASSTHROUGH_LIMIT}


def test_passthrough_body_over_limit(client: TestClient) -> None:
    response = client.post("/v1/agents/ag-1/http/upload", content=chunks(PASSTHROUGH_LIMIT + 1))

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
