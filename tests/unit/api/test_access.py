"""The access middleware on a small app: authentication, rate limits, headers and audit.

The buckets live in memory here; tests/integration/test_gateway_limits.py runs the real
gateway against Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.responses import Response
from starlette.websockets import WebSocketDisconnect

from libs.common import logs
from libs.common.apikeys import StoredKey, hash_key
from services.api.access import AccessControl, AccessLimits
from services.api.auth import KeyRing
from services.api.errors import UNAUTHORIZED_MESSAGE, install_error_handlers
from services.api.forwarded import ClientAddressResolver
from services.api.middleware import AccessMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from services.api.ratelimit import (
    Backend,
    BucketSpec,
    Charge,
    LocalBuckets,
    RateDecision,
    RateLimiter,
)

CI_KEY = "ar_ci-key-for-access-tests"
CLIENT = ("203.0.113.7", 40000)
LIMITS = AccessLimits(
    client=BucketSpec(rate=0.001, burst=6),
    key=BucketSpec(rate=0.001, burst=4),
    overall=BucketSpec(rate=0.001, burst=100),
    auth_failures=BucketSpec(rate=0.001, burst=3),
)


class RecordingAudit:
    """Collect the events that would be published."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event_type: str, **fields: Any) -> None:
        self.events.append(
            {"type": event_type, "correlation_id": logs.current_correlation_id(), **fields}
        )

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == event_type]


class MemoryShared:
    """Shared buckets kept in memory, standing in for Redis."""

    def __init__(self) -> None:
        self.buckets = LocalBuckets()
        self.charges: list[list[Charge]] = []

    async def take(self, charges: Sequence[Charge]) -> RateDecision:
        self.charges.append(list(charges))
        result = self.buckets.take(charges)
        return RateDecision(allowed=result.allowed, levels=result.levels, backend=Backend.REDIS)


def create_access_app(audit: RecordingAudit, shared: MemoryShared, limits: AccessLimits) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, control_limit=100, passthrough_limit=1000)
    app.add_middleware(AccessMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.state.access = AccessControl(
        keyring=KeyRing([StoredKey(key_id="ci", digest=hash_key(CI_KEY))]),
        limiter=RateLimiter(shared),
        resolver=ClientAddressResolver(),
        limits=limits,
        audit=audit,  # type: ignore[arg-type]
    )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/agents")
    async def agents(request: Request) -> dict[str, str]:
        return {"key_id": request.state.key_id, "client": request.state.client.address}

    @app.get("/v1/agents/{agent_id}/http/{path:path}")
    async def passthrough() -> Response:
        return Response(b"agent", headers={"X-RateLimit-Remaining": "999", "Retry-After": "7"})

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("unexpected failure")

    return app


@pytest.fixture
def audit() -> RecordingAudit:
    return RecordingAudit()


@pytest.fixture
def shared() -> MemoryShared:
    return MemoryShared()


@pytest.fixture
def client(audit: RecordingAudit, shared: MemoryShared) -> Iterator[TestClient]:
    app = create_access_app(audit, shared, LIMITS)
    with TestClient(app, client=CLIENT, raise_server_exceptions=False) as test_client:
        yield test_client


KEY = {"X-API-Key": CI_KEY}


def test_authenticated_request_reaches_route(client: TestClient) -> None:
    response = client.get("/v1/agents", headers=KEY)

    assert response.status_code == 200
    assert response.json() == {"key_id": "ci", "client": "203.0.113.7"}


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param({}, "missing_key", id="missing"),
        pytest.param({"X-API-Key": "ar_wrong"}, "invalid_key", id="wrong"),
        pytest.param({"Authorization": "Bearer"}, "missing_key", id="malformed-bearer"),
        pytest.param({"Authorization": "Basic eDp5"}, "missing_key", id="basic"),
        pytest.param({"X-API-Key": "x" * 300}, "invalid_key", id="overlong"),
    ],
)
def test_bad_key_is_401_and_audited(
    client: TestClient, audit: RecordingAudit, headers: dict[str, str], reason: str
) -> None:
    response = client.get("/v1/agents", headers={**headers, "X-Request-ID": "req-401"})

    assert response.status_code == 401
    assert response.json() == {
        "error": {"code": "unauthorized", "message": UNAUTHORIZED_MESSAGE},
        "request_id": "req-401",
    }
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-request-id"] == "req-401"
    [event] = audit.of_type("auth.failed")
    assert event["reason_code"] == reason
    assert event["actor"] == "203.0.113.7"
    assert event["correlation_id"] == "req-401"
    assert event["details"]["client"] == "203.0.113.7"
    assert event["details"]["key_id"] is None
    assert event["details"]["path"] == "/v1/agents"


def test_key_in_query_rejected_and_names_key(client: TestClient, audit: RecordingAudit) -> None:
    response = client.get("/v1/agents", params={"apiKey": CI_KEY}, headers=KEY)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_in_query"
    assert "X-API-Key header" in response.json()["error"]["message"]
    [event] = audit.of_type("auth.rejected")
    assert event["reason_code"] == "api_key_in_query"
    assert event["details"]["key_id"] == "ci"
    assert event["details"]["parameter"] == "apiKey"
    assert CI_KEY not in json.dumps(audit.events, default=str)


def test_key_in_query_rejected_on_healthz(client: TestClient) -> None:
    response = client.get("/healthz", params={"token": CI_KEY})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_in_query"


def test_healthz_needs_no_key(client: TestClient, audit: RecordingAudit) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit"] == "6"
    assert audit.events == []


def test_unknown_path_needs_key(client: TestClient) -> None:
    anonymous = client.get("/v1/nothing-here")
    with_key = client.get("/v1/nothing-here", headers=KEY)

    assert anonymous.status_code == 401
    assert with_key.status_code == 404
    assert with_key.json()["error"]["code"] == "not_found"


def test_successes_audited_once_per_window(client: TestClient, audit: RecordingAudit) -> None:
    for _ in range(3):
        assert client.get("/v1/agents", headers=KEY).status_code == 200

    [event] = audit.of_type("auth.succeeded")
    assert event["actor"] == "ci"
    assert event["details"]["key_id"] == "ci"
    assert event["details"]["client"] == "203.0.113.7"
    assert event["details"]["requests"] == 1


def test_every_response_has_limit_headers(client: TestClient) -> None:
    responses = [
        client.get("/v1/agents", headers=KEY),
        client.get("/v1/agents"),
        client.get("/healthz"),
        client.get("/v1/nothing-here", headers=KEY),
        client.get("/crash", headers=KEY),
    ]

    for response in responses:
        assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(
            response.headers
        ), response
        assert response.headers["x-request-id"]
    assert responses[4].status_code == 500


def test_headers_count_down_on_tightest_bucket(client: TestClient) -> None:
    remaining = [
        client.get("/v1/agents", headers=KEY).headers["x-ratelimit-remaining"] for _ in range(3)
    ]

    # The key's bucket (4) is smaller than the client address's (6).
    assert remaining == ["3", "2", "1"]
    assert client.get("/v1/agents", headers=KEY).headers["x-ratelimit-limit"] == "4"


def test_over_limit_is_429(client: TestClient, audit: RecordingAudit) -> None:
    statuses = [client.get("/v1/agents", headers=KEY).status_code for _ in range(5)]
    response = client.get("/v1/agents", headers={**KEY, "X-Request-ID": "req-429"})

    assert statuses == [200, 200, 200, 200, 429]
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limited"
    assert "API key 'ci'" in response.json()["error"]["message"]
    assert response.json()["request_id"] == "req-429"
    assert response.headers["x-request-id"] == "req-429"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert response.headers["x-ratelimit-limit"] == "4"
    [event] = audit.of_type("ratelimit.rejected")
    assert event["details"]["client"] == "203.0.113.7"
    assert event["details"]["bucket"] == "key"


def test_failed_auth_counts_against_address(client: TestClient, shared: MemoryShared) -> None:
    statuses = [client.get("/v1/agents").status_code for _ in range(4)]
    with_key = client.get("/v1/agents", headers=KEY)

    assert statuses == [401, 401, 401, 429]
    # Once the address used up its failed authentications, a valid key does not help.
    assert with_key.status_code == 429
    assert "failed authentications" in with_key.json()["error"]["message"]
    assert all(charge.kind.value != "global" for charge in shared.charges[0])


def test_failure_over_limit_not_audited_alone(client: TestClient, audit: RecordingAudit) -> None:
    for _ in range(6):
        client.get("/v1/agents", headers={"X-API-Key": "ar_wrong"})

    assert len(audit.of_type("auth.failed")) == 3
    assert len(audit.of_type("ratelimit.rejected")) == 1


def test_path_variants_share_buckets(client: TestClient) -> None:
    paths = ["/v1/agents", "/v1/agents/", "//v1/agents", "/V1/agents", "/v1/%61gents", "/v1/x"]

    statuses = [client.get(path, headers=KEY, follow_redirects=False).status_code for path in paths]

    # The key's bucket holds 4 tokens, whatever the router makes of each path.
    assert statuses == [200, 307, 404, 404, 429, 429]


def test_agent_limit_headers_replaced(client: TestClient) -> None:
    response = client.get(f"/v1/agents/ag-{'0' * 32}/http/", headers=KEY)

    assert response.text == "agent"
    assert response.headers.get_list("x-ratelimit-remaining") == ["3"]
    assert response.headers["retry-after"] == "7"


def test_body_limit_after_access(client: TestClient) -> None:
    anonymous = client.post("/v1/agents", content=b"x" * 200)
    with_key = client.post("/v1/agents", content=b"x" * 200, headers=KEY)

    assert anonymous.status_code == 401
    assert with_key.status_code == 413
    assert with_key.headers["x-ratelimit-limit"] == "4"


def test_websocket_handshake_rejected(client: TestClient) -> None:
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/v1/agents"):
        pass

    assert closed.value.code == 1008
