"""Tests for the proxy's per-agent limits against the real Redis that scripts/deps.sh starts.

Each test counts under its own host id and deletes that host's keys afterwards. The clock is
injected, so window boundaries are exact and no test sleeps.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from libs.common.decisions import Reason
from libs.common.errors import StoreError
from libs.common.messages import new_agent_id
from libs.common.settings import CommonSettings, load_settings
from libs.common.store import connect_redis
from services.proxy.limits import KEY_PREFIX, TTL_MARGIN_SECONDS, Limiter, RateLimits

pytestmark = pytest.mark.integration

WINDOW = 10.0
# The start of window 100000 of 10 s, far from the real time so that no real window is hit.
WINDOW_START = 1_000_000.0
LIMITS = RateLimits(requests_per_window=3, bytes_per_window=1000, window_seconds=WINDOW)


class FakeClock:
    """A clock that stays where a test puts it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client() -> AsyncIterator[redis.Redis]:
    settings = load_settings(CommonSettings, ["--host-id", "limits-test"])
    redis_client = connect_redis(settings)
    yield redis_client
    await redis_client.aclose()


@pytest.fixture
async def host_id(client: redis.Redis) -> AsyncIterator[str]:
    host = f"limits-test-{uuid.uuid4().hex[:12]}"
    yield host
    keys = [key async for key in client.scan_iter(match=f"{KEY_PREFIX}{host}:*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(WINDOW_START + 3.25)


@pytest.fixture
def limiter(client: redis.Redis, host_id: str, clock: FakeClock) -> Limiter:
    return Limiter(client, host_id=host_id, limits=LIMITS, clock=clock)


@pytest.fixture
def closed_port() -> Iterator[int]:
    # A bound socket that never listens: connections to it are refused, and no other
    # process can take the port while the test runs.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def host_keys(client: redis.Redis, host: str) -> list[str]:
    return sorted([key async for key in client.scan_iter(match=f"{KEY_PREFIX}{host}:*")])


async def test_rate_limit_at_n_plus_one(limiter: Limiter) -> None:
    agent = new_agent_id()

    admissions = [await limiter.admit_request(agent) for _ in range(4)]

    assert [admission.decision.reason for admission in admissions] == [
        Reason.ALLOWED,
        Reason.ALLOWED,
        Reason.ALLOWED,
        Reason.RATE_LIMITED,
    ]
    denied = admissions[3].decision
    assert denied.allowed is False
    assert repr(agent) in denied.detail
    assert "made 4 requests" in denied.detail
    assert "the limit is 3" in denied.detail
    assert "request 3 of 3" in admissions[2].decision.detail


async def test_denied_requests_still_count(
    limiter: Limiter, client: redis.Redis, host_id: str
) -> None:
    agent = new_agent_id()

    for _ in range(5):
        await limiter.admit_request(agent)

    assert await client.get(f"{KEY_PREFIX}{host_id}:rate:{agent}:100000") == "5"


async def test_retry_after_is_time_to_window_end(limiter: Limiter) -> None:
    agent = new_agent_id()

    admission = await limiter.admit_request(agent)

    assert admission.retry_after == pytest.approx(WINDOW - 3.25)
    assert admission.retry_after_header == "7"


async def test_window_rollover_resets_counts(limiter: Limiter, clock: FakeClock) -> None:
    agent = new_agent_id()
    for _ in range(3):
        await limiter.admit_request(agent)
    await limiter.add_bytes(agent, 5000)

    clock.now = WINDOW_START + WINDOW - 0.001
    last_moment = await limiter.admit_request(agent)
    clock.now = WINDOW_START + WINDOW
    next_window = await limiter.admit_request(agent)

    assert last_moment.decision.reason is Reason.RATE_LIMITED
    assert last_moment.retry_after == pytest.approx(0.001)
    assert last_moment.retry_after_header == "1"
    assert next_window.decision.reason is Reason.ALLOWED
    assert "request 1 of 3" in next_window.decision.detail
    assert "transferred 0 of 1000 bytes" in next_window.decision.detail
    assert next_window.retry_after == pytest.approx(WINDOW)


async def test_bandwidth_denied_after_add_bytes(limiter: Limiter) -> None:
    agent = new_agent_id()

    await limiter.add_bytes(agent, 600)
    await limiter.add_bytes(agent, 399)
    under = await limiter.admit_request(agent)
    await limiter.add_bytes(agent, 1)
    at_limit = await limiter.admit_request(agent)

    assert under.decision.reason is Reason.ALLOWED
    assert "transferred 999 of 1000 bytes" in under.decision.detail
    assert at_limit.decision.reason is Reason.BANDWIDTH_EXCEEDED
    assert at_limit.decision.allowed is False
    assert repr(agent) in at_limit.decision.detail
    assert "transferred 1000 bytes" in at_limit.decision.detail
    assert "the limit is 1000" in at_limit.decision.detail


async def test_rate_limit_reported_before_bandwidth(limiter: Limiter) -> None:
    agent = new_agent_id()
    await limiter.add_bytes(agent, 5000)

    admissions = [await limiter.admit_request(agent) for _ in range(4)]

    assert [admission.decision.reason for admission in admissions] == [
        Reason.BANDWIDTH_EXCEEDED,
        Reason.BANDWIDTH_EXCEEDED,
        Reason.BANDWIDTH_EXCEEDED,
        Reason.RATE_LIMITED,
    ]


async def test_keys_always_have_ttl(
    limiter: Limiter, client: redis.Redis, host_id: str, clock: FakeClock
) -> None:
    agent = new_agent_id()

    await limiter.admit_request(agent)
    await limiter.add_bytes(agent, 10)
    clock.now = WINDOW_START + WINDOW + 9.5
    await limiter.add_bytes(agent, 10)
    await limiter.admit_request(agent)

    keys = await host_keys(client, host_id)
    assert keys == sorted(
        [
            f"{KEY_PREFIX}{host_id}:bytes:{agent}:100000",
            f"{KEY_PREFIX}{host_id}:bytes:{agent}:100001",
            f"{KEY_PREFIX}{host_id}:rate:{agent}:100000",
            f"{KEY_PREFIX}{host_id}:rate:{agent}:100001",
        ]
    )
    ttls = {key: await client.pttl(key) for key in keys}
    for key, ttl in ttls.items():
        window = int(key.rsplit(":", 1)[1])
        remaining = 6.75 if window == 100000 else 0.5
        assert 0 < ttl <= (remaining + TTL_MARGIN_SECONDS) * 1000, key
        # Redis counts TTLs down in real time, so the test has 5 s to get here.
        assert ttl > (remaining + TTL_MARGIN_SECONDS) * 1000 - 5000, key


async def test_two_limiters_share_counts(
    client: redis.Redis, host_id: str, clock: FakeClock
) -> None:
    first = Limiter(client, host_id=host_id, limits=LIMITS, clock=clock)
    second_client = connect_redis(load_settings(CommonSettings, ["--host-id", "limits-test"]))
    second = Limiter(second_client, host_id=host_id, limits=LIMITS, clock=clock)
    agent = new_agent_id()

    try:
        await first.admit_request(agent)
        await second.admit_request(agent)
        third = await first.admit_request(agent)
        fourth = await second.admit_request(agent)
        await first.add_bytes(agent, 500)
        await second.add_bytes(agent, 500)
        other_agent = await second.admit_request(new_agent_id())
    finally:
        await second_client.aclose()

    assert third.decision.reason is Reason.ALLOWED
    assert fourth.decision.reason is Reason.RATE_LIMITED
    assert "made 4 requests" in fourth.decision.detail
    assert other_agent.decision.reason is Reason.ALLOWED


async def test_bytes_from_two_limiters_add_up(
    client: redis.Redis, host_id: str, clock: FakeClock
) -> None:
    first = Limiter(client, host_id=host_id, limits=LIMITS, clock=clock)
    second = Limiter(client, host_id=host_id, limits=LIMITS, clock=clock)
    agent = new_agent_id()

    await first.add_bytes(agent, 500)
    await second.add_bytes(agent, 500)
    admission = await first.admit_request(agent)

    assert admission.decision.reason is Reason.BANDWIDTH_EXCEEDED
    assert "transferred 1000 bytes" in admission.decision.detail


async def test_hosts_count_separately(client: redis.Redis, host_id: str, clock: FakeClock) -> None:
    agent = new_agent_id()
    this_host = Limiter(client, host_id=host_id, limits=LIMITS, clock=clock)
    other_host_id = f"{host_id}-other"
    other_host = Limiter(client, host_id=other_host_id, limits=LIMITS, clock=clock)

    try:
        for _ in range(3):
            await this_host.admit_request(agent)
        other = await other_host.admit_request(agent)
    finally:
        await client.delete(*await host_keys(client, other_host_id))

    assert other.decision.reason is Reason.ALLOWED
    assert "request 1 of 3" in other.decision.detail


async def test_client_without_decoding(host_id: str, clock: FakeClock) -> None:
    settings = load_settings(CommonSettings, ["--host-id", "limits-test"])
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    raw_client = redis.Redis.from_url(settings.redis_url, password=password)
    limiter = Limiter(raw_client, host_id=host_id, limits=LIMITS, clock=clock)
    agent = new_agent_id()

    try:
        await limiter.add_bytes(agent, 1000)
        admission = await limiter.admit_request(agent)
    finally:
        await raw_client.aclose()

    assert admission.decision.reason is Reason.BANDWIDTH_EXCEEDED


async def test_corrupt_counter_raises_store_error(
    limiter: Limiter, client: redis.Redis, host_id: str
) -> None:
    agent = new_agent_id()
    key = f"{KEY_PREFIX}{host_id}:bytes:{agent}:100000"
    await client.set(key, "not-a-number", ex=60)

    with pytest.raises(StoreError, match="expected an integer") as admit_error:
        await limiter.admit_request(agent)
    with pytest.raises(StoreError, match="cannot add 10 bytes") as add_error:
        await limiter.add_bytes(agent, 10)

    assert repr(key) in str(admit_error.value)
    assert repr(agent) in str(add_error.value)
    assert isinstance(add_error.value.__cause__, RedisError)
    assert await client.get(key) == "not-a-number"


async def test_wrong_key_type_raises_store_error(
    limiter: Limiter, client: redis.Redis, host_id: str
) -> None:
    agent = new_agent_id()
    key = f"{KEY_PREFIX}{host_id}:rate:{agent}:100000"
    await client.hset(key, "field", "value")
    await client.expire(key, 60)

    with pytest.raises(StoreError, match="cannot count a request") as caught:
        await limiter.admit_request(agent)

    assert repr(agent) in str(caught.value)
    assert isinstance(caught.value.__cause__, RedisError)


@pytest.mark.parametrize("count", [-1, 2.5])
async def test_invalid_byte_count_leaves_nothing(
    limiter: Limiter, client: redis.Redis, host_id: str, count: float
) -> None:
    with pytest.raises(ValueError, match="byte count must be an integer of at least 0"):
        await limiter.add_bytes(new_agent_id(), count)  # type: ignore[arg-type]

    assert await host_keys(client, host_id) == []


async def test_invalid_agent_id_leaves_nothing(
    limiter: Limiter, client: redis.Redis, host_id: str
) -> None:
    with pytest.raises(ValueError, match="invalid agent id"):
        await limiter.admit_request("ag-*")

    assert await host_keys(client, host_id) == []


async def test_unreachable_redis_raises_store_error(closed_port: int, clock: FakeClock) -> None:
    # Without retries: the default policy of redis-py 8 retries a refused connection 10 times
    # with backoff, about 4.5 s per call, before it raises the same error.
    unreachable = redis.Redis(
        host="127.0.0.1",
        port=closed_port,
        socket_connect_timeout=2,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    limiter = Limiter(unreachable, host_id="limits-test", limits=LIMITS, clock=clock)
    agent = new_agent_id()

    try:
        with pytest.raises(StoreError, match="cannot count a request") as admit_error:
            await limiter.admit_request(agent)
        with pytest.raises(StoreError, match="cannot add 10 bytes") as add_error:
            await limiter.add_bytes(agent, 10)
    finally:
        await unreachable.aclose()

    assert repr(agent) in str(admit_error.value)
    assert repr(agent) in str(add_error.value)
    assert isinstance(admit_error.value.__cause__, RedisError)
    assert isinstance(add_error.value.__cause__, RedisError)
