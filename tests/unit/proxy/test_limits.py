"""Tests for the limit settings and the argument checks of the limiter, without Redis.

The counting itself runs against a real Redis in tests/integration/test_proxy_limits.py.
"""

from __future__ import annotations

import math

import pytest
import redis.asyncio as redis

from libs.common.decisions import Decision
from libs.common.messages import new_agent_id
from services.proxy.limits import Admission, Limiter, RateLimits

VALID: dict[str, object] = {
    "requests_per_window": 10,
    "bytes_per_window": 1000,
    "window_seconds": 1.0,
}
LIMITS = RateLimits(requests_per_window=10, bytes_per_window=1000, window_seconds=1.0)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("requests_per_window", 0),
        ("requests_per_window", -1),
        ("requests_per_window", 1.5),
        ("requests_per_window", True),
        ("requests_per_window", "10"),
        ("bytes_per_window", 0),
        ("bytes_per_window", -100),
        ("bytes_per_window", 10.0),
        ("bytes_per_window", False),
        ("window_seconds", 0),
        ("window_seconds", 0.0),
        ("window_seconds", -1.0),
        ("window_seconds", math.inf),
        ("window_seconds", math.nan),
        ("window_seconds", True),
        ("window_seconds", "60"),
    ],
)
def test_rate_limits_reject_invalid_value(option: str, value: object) -> None:
    settings = {**VALID, option: value}

    with pytest.raises(ValueError, match=option) as caught:
        RateLimits(**settings)  # type: ignore[arg-type]

    assert repr(value) in str(caught.value)


@pytest.mark.parametrize(
    "settings",
    [
        VALID,
        {"requests_per_window": 1, "bytes_per_window": 1, "window_seconds": 0.001},
        {"requests_per_window": 10**9, "bytes_per_window": 10**15, "window_seconds": 3600},
    ],
)
def test_rate_limits_accept_valid_values(settings: dict[str, object]) -> None:
    limits = RateLimits(**settings)  # type: ignore[arg-type]

    assert limits.requests_per_window == settings["requests_per_window"]
    assert limits.bytes_per_window == settings["bytes_per_window"]
    assert limits.window_seconds == settings["window_seconds"]


def test_rate_limits_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        RateLimits(10, 1000, 1.0)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(0.0, "1"), (0.001, "1"), (0.999, "1"), (1.0, "1"), (1.001, "2"), (59.5, "60")],
)
def test_admission_retry_after_header(retry_after: float, header: str) -> None:
    admission = Admission(decision=Decision.allow("test"), retry_after=retry_after)

    assert admission.retry_after_header == header


def unused_client() -> redis.Redis:
    # redis-py connects on first use. The argument checks must fail before any use, and if
    # one did not, the connection to port 1, where nothing listens, would raise StoreError.
    return redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)


@pytest.mark.parametrize("host_id", ["", "-lead", "has space", "a:b", "a*", "x" * 64])
def test_limiter_rejects_invalid_host_id(host_id: str) -> None:
    with pytest.raises(ValueError, match="invalid host id") as caught:
        Limiter(unused_client(), host_id=host_id, limits=LIMITS)

    assert repr(host_id) in str(caught.value)


@pytest.mark.parametrize(
    "agent_id",
    ["", "ag-", "ag-" + "0" * 31, "ag-" + "G" * 32, "ag-" + "0" * 32 + ":1", "*", "other"],
)
async def test_limiter_rejects_invalid_agent_id(agent_id: str) -> None:
    limiter = Limiter(unused_client(), host_id="unit-host", limits=LIMITS)

    with pytest.raises(ValueError, match="invalid agent id") as admit_error:
        await limiter.admit_request(agent_id)
    with pytest.raises(ValueError, match="invalid agent id") as add_error:
        await limiter.add_bytes(agent_id, 10)

    assert repr(agent_id) in str(admit_error.value)
    assert repr(agent_id) in str(add_error.value)


@pytest.mark.parametrize("count", [-1, 1.5, True, "10", None])
async def test_add_bytes_rejects_invalid_count(count: object) -> None:
    limiter = Limiter(unused_client(), host_id="unit-host", limits=LIMITS)

    with pytest.raises(ValueError, match="byte count must be an integer of at least 0") as caught:
        await limiter.add_bytes(new_agent_id(), count)  # type: ignore[arg-type]

    assert repr(count) in str(caught.value)


async def test_add_bytes_zero_sends_nothing() -> None:
    limiter = Limiter(unused_client(), host_id="unit-host", limits=LIMITS)

    await limiter.add_bytes(new_agent_id(), 0)
