"""Rate limits, client addresses and authentication audit of the real gateway.

The token-bucket script runs against the Redis that scripts/deps.sh starts, under a key prefix
of its own that each test deletes. The gateway tests start `agent-runner-api` with its own
nats-server and no supervisor, so every request comes from 127.0.0.1 over a real socket and
raw paths reach uvicorn unchanged. The Redis-down test starts its own redis-server on a free
loopback port and stops it by pid; the shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from libs.common.settings import CommonSettings, load_settings
from services.api.app import create_app
from services.api.auth import KeyRing
from services.api.errors import UNAUTHORIZED_MESSAGE
from services.api.ratelimit import (
    BucketKind,
    BucketSpec,
    Charge,
    LocalBuckets,
    RedisBuckets,
    connect_limiter_redis,
)
from services.api.settings import ApiSettings
from tests.support.redis_server import RedisServer
from tests.support.stack import VENV_BIN, Stack

pytestmark = pytest.mark.integration

BURST = 10
AUTH_FAILURE_BURST = 4
# So slow that no whole token comes back while a test runs.
SLOW_RATE = "0.001"
LIMIT_ARGS = [
    f"--rate-limit={SLOW_RATE}",
    f"--rate-limit-burst={BURST}",
    f"--auth-failure-rate-limit={SLOW_RATE}",
    f"--auth-failure-rate-limit-burst={AUTH_FAILURE_BURST}",
]
AUDIT_WAIT_SECONDS = 15.0


# ---------------------------------------------------------------------------------------------
# The Lua script against the shared Redis


class FakeClock:
    """A clock that stays where a test puts it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_client() -> AsyncIterator[redis.Redis]:
    client = connect_limiter_redis(load_settings(CommonSettings, []))
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis_client: redis.Redis) -> AsyncIterator[str]:
    value = f"agent-runner:test:gateway-limits:{uuid.uuid4().hex}:"
    yield value
    keys = [key async for key in redis_client.scan_iter(match=f"{value}*")]
    if keys:
        await redis_client.delete(*keys)


def client_charge(spec: BucketSpec, *, subject: str = "203.0.113.7", cost: int = 1) -> Charge:
    return Charge(kind=BucketKind.CLIENT, subject=subject, spec=spec, cost=cost)


async def test_script_allows_burst_then_refills(redis_client: redis.Redis, prefix: str) -> None:
    clock = FakeClock()
    buckets = RedisBuckets(redis_client, key_prefix=prefix, clock=clock)
    spec = BucketSpec(rate=2.0, burst=3)

    burst = [await buckets.take([client_charge(spec)]) for _ in range(4)]
    clock.now += 0.5
    refilled = await buckets.take([client_charge(spec)])

    assert [item.allowed for item in burst] == [True, True, True, False]
    assert [item.levels[0].remaining for item in burst] == [2, 1, 0, 0]
    assert burst[3].retry_after == 1
    assert refilled.allowed is True
    assert refilled.levels[0].tokens == pytest.approx(0.0)


async def test_script_denial_takes_from_no_bucket(redis_client: redis.Redis, prefix: str) -> None:
    buckets = RedisBuckets(redis_client, key_prefix=prefix, clock=FakeClock())
    roomy = client_charge(BucketSpec(rate=1.0, burst=10))
    tiny = Charge(kind=BucketKind.KEY, subject="ci", spec=BucketSpec(rate=1.0, burst=1))
    await buckets.take([roomy, tiny])

    denied = await buckets.take([roomy, tiny])
    alone = await buckets.take([roomy])

    assert denied.allowed is False
    assert denied.levels[0].tokens == pytest.approx(9.0)
    assert alone.levels[0].tokens == pytest.approx(8.0)


async def test_script_zero_cost_bucket_checked_not_taken(
    redis_client: redis.Redis, prefix: str
) -> None:
    buckets = RedisBuckets(redis_client, key_prefix=prefix, clock=FakeClock())
    spec = BucketSpec(rate=1.0, burst=2)
    check = Charge(kind=BucketKind.AUTH_FAILURES, subject="a", spec=spec, cost=0)
    fail = Charge(kind=BucketKind.AUTH_FAILURES, subject="a", spec=spec, cost=1)

    checks = [await buckets.take([check]) for _ in range(3)]
    failures = [await buckets.take([fail]) for _ in range(3)]
    locked = await buckets.take([check])

    assert [item.allowed for item in checks] == [True, True, True]
    assert await redis_client.exists(buckets.key(check)) == 1
    assert [item.allowed for item in failures] == [True, True, False]
    assert locked.allowed is False


async def test_script_keys_expire_when_full(redis_client: redis.Redis, prefix: str) -> None:
    buckets = RedisBuckets(redis_client, key_prefix=prefix)
    charge = client_charge(BucketSpec(rate=2.0, burst=10))

    await buckets.take([charge])
    await buckets.take([charge])
    ttl = await redis_client.pttl(buckets.key(charge))

    # Two tokens at 2 per second come back in 1 s, plus the 1 s margin.
    assert 1000 < ttl <= 2000


async def test_script_with_server_clock_refills(redis_client: redis.Redis, prefix: str) -> None:
    buckets = RedisBuckets(redis_client, key_prefix=prefix)
    spec = BucketSpec(rate=20.0, burst=2)

    first = [await buckets.take([client_charge(spec)]) for _ in range(3)]
    await asyncio.sleep(0.1)
    later = await buckets.take([client_charge(spec)])

    assert [item.allowed for item in first] == [True, True, False]
    assert later.allowed is True


async def test_script_agrees_with_local_buckets(redis_client: redis.Redis, prefix: str) -> None:
    clock = FakeClock()
    shared = RedisBuckets(redis_client, key_prefix=prefix, clock=clock)
    local = LocalBuckets(clock=clock)
    specs = [BucketSpec(rate=1.5, burst=4), BucketSpec(rate=0.5, burst=2)]
    generator = random.Random(7)

    for _ in range(200):
        clock.now += generator.choice([0.0, 0.1, 0.25, 0.7, 2.0])
        charges = [
            Charge(
                kind=BucketKind.CLIENT,
                subject=generator.choice(["a", "b"]),
                spec=specs[0],
                cost=1,
            ),
            Charge(kind=BucketKind.KEY, subject="k", spec=specs[1], cost=generator.choice([0, 1])),
        ]
        in_redis = await shared.take(charges)
        in_memory = local.take(charges)

        assert in_redis.allowed == in_memory.allowed
        for remote, mine in zip(in_redis.levels, in_memory.levels, strict=True):
            assert remote.tokens == pytest.approx(mine.tokens, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# A real gateway without supervisors


def start_gateway(stack: Stack, *, second_key: bool = False) -> str | None:
    """Create the stack's key and start its nats-server and gateway, nothing else.

    Returns a second key, with id `second`, when `second_key` is set.
    """
    stack.workdir.mkdir(parents=True, exist_ok=True)
    key_file = stack.workdir / "api-keys"
    keys = []
    for key_id in ("tests", "second") if second_key else ("tests",):
        keys.append(
            subprocess.run(
                [VENV_BIN / "agent-runner", "keys", "create", "--file", key_file, "--id", key_id],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    stack.api_key = keys[0]
    stack.start_nats()
    stack.start_api()
    return keys[1] if second_key else None


@dataclass
class Gateway:
    """A running gateway-only stack and, when asked for, a second API key."""

    stack: Stack
    second_key: str | None = None

    @property
    def second_headers(self) -> dict[str, str]:
        assert self.second_key is not None
        return {"X-API-Key": self.second_key}


@contextlib.contextmanager
def gateway(workdir: Path, *args: str, second_key: bool = False) -> Iterator[Gateway]:
    """Run a gateway-only stack with LIMIT_ARGS and `args`, and remove it and its keys."""
    stack = Stack(workdir=workdir, netguard=False, api_args=[*LIMIT_ARGS, *args])
    try:
        yield Gateway(stack, start_gateway(stack, second_key=second_key))
    finally:
        for name in ("api", "nats"):
            if name in stack.processes:
                stack.stop_service(name)
        stack._forget_cache_state()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Stack]:
    """A gateway that trusts no proxy, with the small buckets of LIMIT_ARGS."""
    with gateway(tmp_path / "limited") as running:
        yield running.stack


@pytest.fixture
def behind_proxy(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway that trusts 127.0.0.0/8 and 198.51.100.0/24 as reverse proxies."""
    with gateway(
        tmp_path / "behind-proxy",
        "--trusted-proxies=127.0.0.0/8,198.51.100.0/24",
        second_key=True,
    ) as running:
        yield running


@pytest.fixture
def roomy(tmp_path: Path) -> Iterator[Stack]:
    """A gateway with buckets large enough for every request of a test."""
    with gateway(
        tmp_path / "roomy", "--rate-limit-burst=1000", "--auth-failure-rate-limit-burst=1000"
    ) as running:
        yield running.stack


def raw_get(stack: Stack, target: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    """Send GET `target` exactly as written and return status, headers and JSON body."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.api_port, timeout=30)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        received = {name.lower(): value for name, value in response.getheaders()}
        return response.status, received, json.loads(body) if body else None
    finally:
        connection.close()


def remaining(response: httpx.Response) -> int:
    return int(response.headers["x-ratelimit-remaining"])


def assert_limit_headers(headers: httpx.Headers | dict[str, str]) -> None:
    assert int(headers["x-ratelimit-limit"]) >= 1
    assert int(headers["x-ratelimit-remaining"]) >= 0
    assert int(headers["x-ratelimit-reset"]) >= 0


def assert_rate_limited(status: int, headers: httpx.Headers | dict[str, str], body: Any) -> None:
    assert status == 429, body
    assert body["error"]["code"] == "rate_limited"
    assert body["request_id"] == headers["x-request-id"]
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining"] == "0"
    assert_limit_headers(headers)


def test_headers_on_success_and_429(limited: Stack) -> None:
    with httpx.Client(base_url=limited.api_url, headers=limited.headers, timeout=30) as api:
        first = api.get("/v1/agents")
        left = remaining(first)
        allowed = [api.get("/v1/agents") for _ in range(left)]
        denied = api.get("/v1/agents", headers={"X-Request-ID": "limits-429"})

    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit"] == str(BURST)
    assert 0 < left < BURST
    assert [response.status_code for response in allowed] == [200] * left
    assert [remaining(response) for response in allowed] == list(range(left - 1, -1, -1))
    for response in allowed:
        assert_limit_headers(response.headers)
        assert "retry-after" not in response.headers
    assert_rate_limited(denied.status_code, denied.headers, denied.json())
    assert denied.headers["x-request-id"] == "limits-429"
    assert denied.headers["x-ratelimit-limit"] == str(BURST)
    assert "client address 127.0.0.1" in denied.json()["error"]["message"]


SPOOFED_HEADERS = [
    {"X-Forwarded-For": "203.0.113.{n}"},
    {"X-Forwarded-For": "198.51.100.{n}, 203.0.113.{n}"},
    {"Forwarded": "for=203.0.113.{n}"},
    {"Forwarded": 'for="[2001:db8::{n}]:4711"'},
    {"X-Real-IP": "203.0.113.{n}"},
    {"X-Forwarded-For": "203.0.113.{n}", "Forwarded": "for=198.51.100.{n}", "X-Real-IP": "::1"},
]


def test_forwarded_headers_from_untrusted_client_ignored(limited: Stack) -> None:
    results = []
    for n in range(BURST + 2):
        spoofed = {name: value.format(n=n) for name, value in SPOOFED_HEADERS[n % 6].items()}
        results.append(raw_get(limited, "/v1/agents", {**limited.headers, **spoofed}))

    remaining_values = [int(headers["x-ratelimit-remaining"]) for _, headers, _ in results]
    allowed = [status for status, _, _ in results if status == 200]
    # Every request drew from the bucket of 127.0.0.1, so the count only went down.
    assert remaining_values == sorted(remaining_values, reverse=True)
    assert 0 < len(allowed) < BURST
    status, headers, body = results[-1]
    assert_rate_limited(status, headers, body)
    assert "127.0.0.1" in body["error"]["message"]


PATH_VARIANTS = [
    "/v1/agents",
    "/v1/agents/",
    "//v1/agents",
    "/V1/agents",
    "/v1/%61gents",
    "/v1/agents%2F",
    "/v1//agents",
    "/./v1/agents",
    "/v1/agents?",
    "/%2Fv1/agents",
    "/v1/agents/../agents",
]


def test_path_variants_share_bucket(limited: Stack) -> None:
    results = [raw_get(limited, target, limited.headers) for target in PATH_VARIANTS]

    statuses = [status for status, _, _ in results]
    counts = [int(headers["x-ratelimit-remaining"]) for _, headers, _ in results]
    first_denied = statuses.index(429)
    # Each variant took one token from the same bucket, whatever the router returned.
    assert counts[:first_denied] == list(range(counts[0], counts[0] - first_denied, -1))
    assert set(statuses[first_denied:]) == {429}
    for status, headers, body in results[first_denied:]:
        assert_rate_limited(status, headers, body)


def test_failed_authentications_counted(limited: Stack) -> None:
    with httpx.Client(base_url=limited.api_url, timeout=30) as anonymous:
        failures = [
            anonymous.get("/v1/agents", headers={"X-API-Key": f"ar_wrong{n}"})
            for n in range(AUTH_FAILURE_BURST + 1)
        ]
        with_key = anonymous.get("/v1/agents", headers=limited.headers)
        health = anonymous.get("/healthz")

    statuses = [response.status_code for response in failures]
    assert statuses == [401] * AUTH_FAILURE_BURST + [429]
    for response in failures[:-1]:
        assert response.json()["error"]["message"] == UNAUTHORIZED_MESSAGE
        assert_limit_headers(response.headers)
    assert_rate_limited(429, failures[-1].headers, failures[-1].json())
    assert "failed authentications" in failures[-1].json()["error"]["message"]
    assert_rate_limited(429, with_key.headers, with_key.json())
    # /healthz needs no key, so the failed-authentication bucket does not apply to it.
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert_limit_headers(health.headers)


def test_healthz_rate_limited(limited: Stack) -> None:
    with httpx.Client(base_url=limited.api_url, timeout=30) as anonymous:
        responses = [anonymous.get("/healthz") for _ in range(BURST + 1)]

    assert responses[0].status_code == 200
    assert responses[0].json() == {"status": "ok"}
    assert responses[-1].status_code == 429
    assert_rate_limited(429, responses[-1].headers, responses[-1].json())


def test_trusted_proxy_chain_honoured(behind_proxy: Gateway) -> None:
    stack = behind_proxy.stack

    def as_client(address: str, spoofed_left: str, headers: dict[str, str]) -> dict[str, str]:
        chain = f"{spoofed_left}, {address}, 198.51.100.1"
        return {**headers, "X-Forwarded-For": chain}

    first = [
        raw_get(stack, "/v1/agents", as_client("203.0.113.5", f"192.0.2.{n}", stack.headers))
        for n in range(BURST + 1)
    ]
    other = raw_get(
        stack, "/v1/agents", as_client("203.0.113.6", "192.0.2.1", behind_proxy.second_headers)
    )

    # The left part of the chain changed on every request and did not escape the bucket.
    assert [status for status, _, _ in first] == [200] * BURST + [429]
    assert "client address 203.0.113.5" in first[-1][2]["error"]["message"]
    # Another client behind the same proxy has a bucket of its own.
    assert other[0] == 200
    assert other[1]["x-ratelimit-remaining"] == str(BURST - 1)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Real-IP", "203.0.113.8"),
        ("Forwarded", "for=203.0.113.8"),
    ],
)
def test_other_forwarded_headers_ignored_behind_proxy(
    behind_proxy: Gateway, header: str, value: str
) -> None:
    # The gateway reads only X-Forwarded-For (--forwarded-header), which the proxy sets, so
    # this request counts against the proxy's own address.
    stack = behind_proxy.stack
    status, _, _ = raw_get(stack, "/v1/agents", {**stack.headers, header: value})
    fresh_status, fresh_headers, _ = raw_get(
        stack, "/v1/agents", {**behind_proxy.second_headers, "X-Forwarded-For": "203.0.113.8"}
    )

    assert status == 200
    assert fresh_status == 200
    assert fresh_headers["x-ratelimit-remaining"] == str(BURST - 1)


def test_global_limit_applies_across_clients(tmp_path: Path) -> None:
    with gateway(
        tmp_path / "global",
        "--trusted-proxies=127.0.0.0/8",
        "--rate-limit-burst=100",
        "--global-rate-limit=0.001",
        "--global-rate-limit-burst=5",
    ) as running:
        stack = running.stack
        results = [
            raw_get(stack, "/v1/agents", {**stack.headers, "X-Forwarded-For": f"203.0.113.{n}"})
            for n in range(6)
        ]
        anonymous = raw_get(stack, "/v1/agents", {"X-Forwarded-For": "203.0.113.99"})

    assert [status for status, _, _ in results] == [200] * 5 + [429]
    assert_rate_limited(*results[-1])
    assert "overall request limit" in results[-1][2]["error"]["message"]
    assert results[-1][1]["x-ratelimit-limit"] == "5"
    # Failed authentications do not draw from the global bucket.
    assert anonymous[0] == 401


def gateway_routes() -> list[tuple[str, str]]:
    """Return (method, path) of every route: those in the OpenAPI schema and /openapi.json."""
    settings = load_settings(ApiSettings, [])
    app = create_app(settings, keyring=KeyRing.load(key_file=None, plain_keys="unused"))
    routes = [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    ]
    return [*routes, ("GET", "/openapi.json")]


def test_every_route_but_healthz_needs_key(roomy: Stack) -> None:
    routes = gateway_routes()
    checked = []
    with httpx.Client(base_url=roomy.api_url, timeout=30) as anonymous:
        for method, path in routes:
            url = path.replace("{agent_id}", f"ag-{'0' * 32}").replace("{path}", "x")
            for headers in ({}, {"X-API-Key": "ar_wrong"}, {"Authorization": "Bearer ar_x"}):
                response = anonymous.request(method, url, headers=headers)
                if path == "/healthz":
                    assert response.status_code == 200, (method, url)
                    continue
                assert response.status_code == 401, (method, url, response.text)
                if method != "HEAD":
                    assert response.json()["error"]["code"] == "unauthorized"
                    assert response.json()["error"]["message"] == UNAUTHORIZED_MESSAGE
                checked.append((method, path))

    for expected in [
        ("POST", "/v1/agents"),
        ("GET", "/v1/agents"),
        ("DELETE", "/v1/agents/{agent_id}"),
        ("GET", "/v1/agents/{agent_id}/logs"),
        ("PATCH", "/v1/agents/{agent_id}/http/{path}"),
        ("POST", "/v1/cache/purge"),
        ("GET", "/readyz"),
        ("GET", "/openapi.json"),
    ]:
        assert expected in checked, expected


def wait_for_events(stack: Stack, predicate: Any, *, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + AUDIT_WAIT_SECONDS
    while True:
        events = [event for event in stack.audit_events() if predicate(event)]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_authentication_audited_without_key(limited: Stack) -> None:
    with httpx.Client(base_url=limited.api_url, timeout=30) as api:
        for _ in range(3):
            assert api.get("/v1/agents", headers=limited.headers).status_code == 200
        assert api.get("/v1/agents", headers={"X-API-Key": "ar_wrong"}).status_code == 401
        assert api.get("/v1/agents").status_code == 401
        leaked = api.get("/v1/agents", params={"api_key": limited.api_key})
        assert leaked.status_code == 401

    auth_events = wait_for_events(limited, lambda e: e["type"].startswith("auth."), count=4)

    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in auth_events:
        by_type.setdefault(event["type"], []).append(event)
    [success] = by_type["auth.succeeded"]
    assert success["outcome"] == "success"
    assert success["details"]["key_id"] == "tests"
    assert success["details"]["client"] == "127.0.0.1"
    assert success["details"]["requests"] == 1
    assert sorted(event["reason_code"] for event in by_type["auth.failed"]) == [
        "invalid_key",
        "missing_key",
    ]
    for event in by_type["auth.failed"]:
        assert event["outcome"] == "denied"
        assert event["details"]["client"] == "127.0.0.1"
        assert event["details"]["key_id"] is None
    [rejected] = by_type["auth.rejected"]
    assert rejected["reason_code"] == "api_key_in_query"
    assert rejected["details"]["key_id"] == "tests"
    assert rejected["details"]["parameter"] == "api_key"
    assert limited.api_key not in json.dumps(limited.audit_events())
    assert limited.api_key not in limited.log_text("api")


def test_successes_counted_at_shutdown(limited: Stack) -> None:
    with httpx.Client(base_url=limited.api_url, headers=limited.headers, timeout=30) as api:
        for _ in range(4):
            assert api.get("/v1/agents").status_code == 200

    limited.stop_service("api")
    events = wait_for_events(limited, lambda e: e["type"] == "auth.succeeded", count=2)

    assert [event["details"]["requests"] for event in events] == [1, 3]


# ---------------------------------------------------------------------------------------------
# Redis stopped


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def on_own_redis(tmp_path: Path, own_redis: RedisServer) -> Iterator[Stack]:
    """A gateway whose agent store and rate limits use `own_redis`."""
    with gateway(
        tmp_path / "own-redis",
        f"--redis-url=redis://127.0.0.1:{own_redis.port}/0",
        f"--redis-password={own_redis.password}",
    ) as running:
        yield running.stack


def test_redis_down_counts_locally(on_own_redis: Stack, own_redis: RedisServer) -> None:
    with httpx.Client(
        base_url=on_own_redis.api_url, headers=on_own_redis.headers, timeout=30
    ) as api:
        before = api.get("/v1/agents")
        assert before.status_code == 200
        own_redis.stop()

        started = time.monotonic()
        health = api.get("/healthz")
        agents = api.get("/v1/agents", headers={"X-Request-ID": "redis-down"})
        readiness = api.get("/readyz")
        elapsed = time.monotonic() - started
        flood = [api.get("/healthz") for _ in range(BURST + 1)]
        events = wait_for_events(
            on_own_redis, lambda e: e["type"] == "ratelimit.backend_changed", count=1
        )

        own_redis.start()
        time.sleep(1.5)
        recovered = api.get("/readyz")

    assert health.status_code == 200
    assert_limit_headers(health.headers)
    assert agents.status_code == 503
    assert agents.json()["error"]["code"] == "store_unavailable"
    assert agents.json()["request_id"] == "redis-down"
    assert_limit_headers(agents.headers)
    assert readiness.status_code == 503
    assert readiness.json()["redis"] == "down"
    assert readiness.json()["rate_limiter"] == "local"
    assert elapsed < 10
    # The local buckets started full when Redis went away, and still run out.
    assert flood[-1].status_code == 429
    assert_rate_limited(429, flood[-1].headers, flood[-1].json())
    assert events[0]["details"]["backend"] == "local"
    assert recovered.json()["rate_limiter"] == "redis"
    assert recovered.json()["redis"] == "ok"


# ---------------------------------------------------------------------------------------------
# Request validation on a production gateway


@pytest.fixture
def production(tmp_path: Path) -> Iterator[Stack]:
    """A production-profile gateway, which accepts only https:// image URLs."""
    stack = Stack(
        workdir=tmp_path / "production",
        netguard=False,
        profile="production",
        api_args=["--insecure-http", "--rate-limit-burst=1000"],
    )
    try:
        start_gateway(stack)
        yield stack
    finally:
        for name in ("api", "nats"):
            if name in stack.processes:
                stack.stop_service(name)
        stack._forget_cache_state()


def assert_invalid_request(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"]["code"] == "invalid_request"
    assert body["request_id"] == response.headers["x-request-id"]
    assert_limit_headers(response.headers)
    message: str = body["error"]["message"]
    return message


DIGEST = "sha256:" + "ab" * 32


def unique(url: str) -> str:
    """Return `url` with a query that makes it unique, to look for its agent afterwards."""
    return f"{url}?case={uuid.uuid4().hex}"


def agents_with_url(api: httpx.Client, url: str) -> list[dict[str, Any]]:
    """Return the listed agents started from `url`; the list is shared by every stack."""
    return [agent for agent in api.get("/v1/agents").json()["agents"] if agent["image_url"] == url]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/agent.tar",
        "HTTP://127.0.0.1/agent.tar",
        "Http://127.0.0.1/agent.tar",
    ],
)
def test_http_image_url_rejected_in_any_case(production: Stack, url: str) -> None:
    url = unique(url)
    with httpx.Client(base_url=production.api_url, headers=production.headers, timeout=30) as api:
        response = api.post("/v1/agents", json={"image_url": url, "image_digest": DIGEST})
        started = agents_with_url(api, url)

    assert "https://" in assert_invalid_request(response)
    assert started == []


@pytest.mark.parametrize(
    ("method", "path", "parameter"),
    [
        ("GET", "/v1/agents", "wiat"),
        ("POST", "/v1/agents", "wait_for"),
        ("GET", f"/v1/agents/ag-{'0' * 32}/logs", "lines"),
        ("POST", "/v1/cache/purge", "all"),
        ("GET", "/readyz", "verbose"),
    ],
)
def test_unknown_query_parameter_rejected(
    production: Stack, method: str, path: str, parameter: str
) -> None:
    url = unique("https://127.0.0.1/a.tar")
    body = {"image_url": url, "image_digest": DIGEST} if path == "/v1/agents" else {}
    with httpx.Client(base_url=production.api_url, headers=production.headers, timeout=30) as api:
        response = api.request(method, path, params={parameter: "1"}, json=body)
        started = agents_with_url(api, url)

    assert parameter in assert_invalid_request(response)
    assert started == []


def test_overlong_agent_id_rejected(production: Stack) -> None:
    with httpx.Client(base_url=production.api_url, headers=production.headers, timeout=30) as api:
        response = api.get(f"/v1/agents/ag-{'0' * 100}")

    message = assert_invalid_request(response)
    assert "agent_id" in message


def test_nul_in_env_value_rejected(production: Stack) -> None:
    url = unique("https://127.0.0.1/a.tar")
    body = {"image_url": url, "image_digest": DIGEST, "env": {"A": "x\0y"}}
    with httpx.Client(base_url=production.api_url, headers=production.headers, timeout=30) as api:
        response = api.post("/v1/agents", json=body)
        started = agents_with_url(api, url)

    assert "NUL" in assert_invalid_request(response)
    assert started == []


@pytest.mark.parametrize(
    ("request_id", "kept"),
    [
        pytest.param("client-id.1:2_3", True, id="safe"),
        pytest.param("x" * 129, False, id="too-long"),
        pytest.param("has space", False, id="space"),
        pytest.param("<script>", False, id="markup"),
    ],
)
def test_request_id_on_every_error(production: Stack, request_id: str, kept: bool) -> None:
    headers = {"X-Request-ID": request_id}
    with httpx.Client(base_url=production.api_url, timeout=30) as api:
        responses = [
            api.get("/v1/agents", headers=headers),
            api.get(
                "/v1/agents",
                headers={**headers, **production.headers, "X-Request-ID": request_id},
                params={"x": "1"},
            ),
            api.get("/nowhere", headers={**headers, **production.headers}),
            api.post("/v1/agents", headers={**headers, **production.headers}, content=b"{"),
            api.post(
                "/v1/agents",
                headers={**headers, **production.headers},
                content=b"x" * (64 * 1024 + 1),
            ),
        ]

    assert [response.status_code for response in responses] == [401, 422, 404, 422, 413]
    for response in responses:
        echoed = response.headers["x-request-id"]
        assert response.json()["request_id"] == echoed
        assert (echoed == request_id) is kept
        assert_limit_headers(response.headers)
