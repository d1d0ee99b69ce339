"""Token-bucket arithmetic, response headers and the local fallback of the gateway's limiter.

tests/integration/test_gateway_limits.py runs the same cases against the Lua script in Redis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from services.api.ratelimit import (
    Backend,
    BucketKind,
    BucketSpec,
    Charge,
    Level,
    LocalBuckets,
    RateDecision,
    RateLimiter,
    admits,
    refill,
)

SPEC = BucketSpec(rate=2.0, burst=5)


class FakeClock:
    """A clock that stays where a test puts it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def charge(
    kind: BucketKind = BucketKind.CLIENT,
    subject: str = "203.0.113.7",
    spec: BucketSpec = SPEC,
    cost: int = 1,
) -> Charge:
    return Charge(kind=kind, subject=subject, spec=spec, cost=cost)


@pytest.mark.parametrize(
    ("rate", "burst"),
    [
        pytest.param(0.0, 5, id="zero-rate"),
        pytest.param(-1.0, 5, id="negative-rate"),
        pytest.param(math.inf, 5, id="infinite-rate"),
        pytest.param(math.nan, 5, id="nan-rate"),
        pytest.param(1.0, 0, id="zero-burst"),
        pytest.param(1.0, True, id="bool-burst"),
        pytest.param(1.0, 2.5, id="fractional-burst"),
    ],
)
def test_bucket_spec_rejects(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        BucketSpec(rate=rate, burst=burst)


@pytest.mark.parametrize(
    ("tokens", "updated", "now", "expected"),
    [
        pytest.param(0.0, 10.0, 10.0, 0.0, id="no-time"),
        pytest.param(0.0, 10.0, 11.0, 2.0, id="one-second"),
        pytest.param(1.5, 10.0, 10.25, 2.0, id="quarter-second"),
        pytest.param(4.0, 10.0, 20.0, 5.0, id="capped-at-burst"),
        pytest.param(1.0, 10.0, 9.0, 1.0, id="clock-went-back"),
        pytest.param(-0.5, 10.0, 10.5, 0.5, id="from-below-zero"),
    ],
)
def test_refill(tokens: float, updated: float, now: float, expected: float) -> None:
    assert refill(tokens, updated, now, SPEC) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("tokens", "cost", "expected"),
    [
        (1.0, 1, True),
        (0.999, 1, False),
        (0.0, 0, False),
        (0.5, 0, False),
        (1.0, 0, True),
        (5.0, 1, True),
    ],
)
def test_admits(tokens: float, cost: int, expected: bool) -> None:
    assert admits(tokens, cost) is expected


def test_local_bucket_allows_burst_then_denies() -> None:
    buckets = LocalBuckets(clock=FakeClock())

    decisions = [buckets.take([charge()]) for _ in range(6)]

    assert [decision.allowed for decision in decisions] == [True] * 5 + [False]
    assert [decision.levels[0].remaining for decision in decisions] == [4, 3, 2, 1, 0, 0]


def test_local_bucket_refills_at_rate() -> None:
    clock = FakeClock()
    buckets = LocalBuckets(clock=clock)
    for _ in range(5):
        buckets.take([charge()])

    clock.now += 0.4
    early = buckets.take([charge()])
    clock.now += 0.1
    on_time = buckets.take([charge()])
    after = buckets.take([charge()])

    assert early.allowed is False
    assert on_time.allowed is True
    assert after.allowed is False


def test_denied_request_takes_nothing() -> None:
    clock = FakeClock()
    buckets = LocalBuckets(clock=clock)
    small = charge(kind=BucketKind.KEY, subject="ci", spec=BucketSpec(rate=1.0, burst=1))
    buckets.take([charge(), small])

    denied = buckets.take([charge(), small])
    alone = buckets.take([charge()])

    assert denied.allowed is False
    assert denied.levels[0].tokens == pytest.approx(4.0)
    assert alone.levels[0].tokens == pytest.approx(3.0)


def test_zero_cost_bucket_must_not_be_empty() -> None:
    buckets = LocalBuckets(clock=FakeClock())
    failures = charge(kind=BucketKind.AUTH_FAILURES, spec=BucketSpec(rate=1.0, burst=2))
    check_only = charge(kind=BucketKind.AUTH_FAILURES, spec=BucketSpec(rate=1.0, burst=2), cost=0)

    first_check = buckets.take([check_only])
    buckets.take([failures])
    buckets.take([failures])
    second_check = buckets.take([check_only])

    assert first_check.allowed is True
    assert first_check.levels[0].tokens == 2.0
    assert second_check.allowed is False


def test_buckets_are_separate_by_name() -> None:
    buckets = LocalBuckets(clock=FakeClock())
    for _ in range(5):
        buckets.take([charge(subject="203.0.113.7")])

    other = buckets.take([charge(subject="203.0.113.8")])

    assert other.allowed is True
    assert other.levels[0].remaining == 4


def test_local_buckets_bounded() -> None:
    buckets = LocalBuckets(clock=FakeClock(), max_buckets=3)
    for index in range(10):
        buckets.take([charge(subject=f"198.51.100.{index}")])

    assert len(buckets) == 3


@pytest.mark.parametrize(
    ("kind", "subject", "expected"),
    [
        (BucketKind.CLIENT, "203.0.113.7", "client:203.0.113.7"),
        (BucketKind.CLIENT, "2001:db8::/64", "client:2001:db8::/64"),
        (BucketKind.KEY, "ci", "key:ci"),
        (BucketKind.GLOBAL, "", "global"),
        (BucketKind.AUTH_FAILURES, "203.0.113.7", "auth-failures:203.0.113.7"),
    ],
)
def test_bucket_name(kind: BucketKind, subject: str, expected: str) -> None:
    assert charge(kind=kind, subject=subject).name == expected


def decision(allowed: bool, *levels: tuple[Charge, float]) -> RateDecision:
    return RateDecision(
        allowed=allowed,
        levels=tuple(Level(item, tokens) for item, tokens in levels),
        backend=Backend.LOCAL,
    )


def test_headers_of_allowed_request() -> None:
    allowed = decision(True, (charge(), 2.5))

    assert dict(allowed.headers()) == {
        b"x-ratelimit-limit": b"5",
        b"x-ratelimit-remaining": b"2",
        b"x-ratelimit-reset": b"2",
    }


def test_headers_describe_tightest_bucket() -> None:
    client = charge(spec=BucketSpec(rate=10.0, burst=100))
    key = charge(kind=BucketKind.KEY, subject="ci", spec=BucketSpec(rate=1.0, burst=10))
    overall = charge(kind=BucketKind.GLOBAL, subject="", spec=BucketSpec(rate=100.0, burst=1000))

    allowed = decision(True, (client, 50.0), (key, 3.0), (overall, 900.0))

    assert allowed.limiting is not None
    assert allowed.limiting.charge is key
    assert dict(allowed.headers())[b"x-ratelimit-limit"] == b"10"
    assert dict(allowed.headers())[b"x-ratelimit-remaining"] == b"3"
    assert dict(allowed.headers())[b"x-ratelimit-reset"] == b"7"


def test_zero_cost_bucket_not_in_headers_when_allowed() -> None:
    failures = charge(kind=BucketKind.AUTH_FAILURES, spec=BucketSpec(rate=1.0, burst=2), cost=0)

    allowed = decision(True, (charge(), 4.0), (failures, 1.0))

    assert allowed.limiting is not None
    assert allowed.limiting.charge.kind is BucketKind.CLIENT


def test_headers_of_denied_request() -> None:
    denied = decision(False, (charge(), 0.25))

    assert dict(denied.headers()) == {
        b"x-ratelimit-limit": b"5",
        b"x-ratelimit-remaining": b"0",
        b"x-ratelimit-reset": b"3",
        b"retry-after": b"1",
    }


def test_denial_names_slowest_empty_bucket() -> None:
    fast = charge(spec=BucketSpec(rate=10.0, burst=5))
    slow = charge(kind=BucketKind.AUTH_FAILURES, spec=BucketSpec(rate=0.1, burst=3))

    denied = decision(False, (fast, 0.5), (slow, 0.2), (charge(kind=BucketKind.KEY), 4.0))

    assert denied.limiting is not None
    assert denied.limiting.charge is slow
    assert denied.retry_after == 8
    assert dict(denied.headers())[b"retry-after"] == b"8"


def test_retry_after_at_least_one_second() -> None:
    denied = decision(False, (charge(spec=BucketSpec(rate=1000.0, burst=5)), 0.999))

    assert denied.retry_after == 1


class FlakyShared:
    """Shared buckets that fail while `down` is set, and otherwise decide in memory."""

    def __init__(self, clock: FakeClock) -> None:
        self.down = False
        self.calls = 0
        self._buckets = LocalBuckets(clock=clock)

    async def take(self, charges: Sequence[Charge]) -> RateDecision:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("Connection refused")
        result = self._buckets.take(charges)
        return RateDecision(allowed=result.allowed, levels=result.levels, backend=Backend.REDIS)


async def test_limiter_falls_back_to_local_and_recovers() -> None:
    clock = FakeClock()
    shared = FlakyShared(clock)
    changes: list[Backend] = []
    limiter = RateLimiter(
        shared,
        local=LocalBuckets(clock=clock),
        retry_seconds=1.0,
        clock=clock,
        on_backend_change=lambda backend, _: changes.append(backend),
    )

    first = await limiter.take([charge()])
    shared.down = True
    failed_over = await limiter.take([charge()])
    during = await limiter.take([charge()])
    calls_during = shared.calls
    shared.down = False
    clock.now += 1.0
    recovered = await limiter.take([charge()])

    assert first.backend is Backend.REDIS
    assert failed_over.backend is Backend.LOCAL
    assert during.backend is Backend.LOCAL
    assert calls_during == 2
    assert recovered.backend is Backend.REDIS
    assert changes == [Backend.LOCAL, Backend.REDIS]
    assert limiter.backend is Backend.REDIS


async def test_local_fallback_still_limits() -> None:
    clock = FakeClock()
    shared = FlakyShared(clock)
    shared.down = True
    limiter = RateLimiter(shared, local=LocalBuckets(clock=clock), clock=clock)

    decisions = [await limiter.take([charge()]) for _ in range(6)]

    assert [item.allowed for item in decisions] == [True] * 5 + [False]
    assert {item.backend for item in decisions} == {Backend.LOCAL}
