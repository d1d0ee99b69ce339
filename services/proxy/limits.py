"""Per-agent request-rate and bandwidth limits of the egress proxy, counted in Redis.

The proxy calls `Limiter.admit_request` once per request before it connects upstream, and
`Limiter.add_bytes` as bytes flow in either direction. The counters live in Redis rather than
in process memory so that every proxy process on a host counts against the same limits.

Counting uses fixed windows of `window_seconds`, numbered from the Unix epoch. Keys:

- `agent-runner:proxy:<host>:rate:<agent>:<window>`: requests the agent made in that window
  (`dns` instead of `rate` for the DNS filter's limiter, which counts queries on their own).
- `agent-runner:proxy:<host>:bytes:<agent>:<window>`: bytes it sent and received in it.

Each key is written together with its expiry in one MULTI/EXEC transaction, so no key lives
without a TTL, and it expires shortly after its window ends.

Redis errors raise `StoreError`. The proxy must then deny the request with
`Reason.LIMITER_UNAVAILABLE` (fail closed), because an agent must not escape its limits by
making Redis unreachable or slow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from pydantic import TypeAdapter, ValidationError
from redis.exceptions import RedisError

from libs.common.decisions import Decision, Reason
from libs.common.errors import StoreError
from libs.common.messages import AgentId, HostId

KEY_PREFIX = "agent-runner:proxy:"
# How long a key outlives its window. Every proxy process reads the same host clock, so this
# only covers the time between reading the clock and Redis running the transaction.
TTL_MARGIN_SECONDS = 1.0

_AGENT_ID = TypeAdapter(AgentId)
_HOST_ID = TypeAdapter(HostId)


def _check_positive_int(option: str, value: object) -> None:
    # bool is a subclass of int, and True would silently mean a limit of 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer of at least 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RateLimits:
    """The limits of one agent in each fixed window of `window_seconds` seconds.

    Raises `ValueError` naming the option and value when a count is not an integer of at
    least 1 or the window is not a finite number of seconds above zero.
    """

    requests_per_window: int
    bytes_per_window: int
    window_seconds: float

    def __post_init__(self) -> None:
        _check_positive_int("requests_per_window", self.requests_per_window)
        _check_positive_int("bytes_per_window", self.bytes_per_window)

        window = self.window_seconds
        if (
            isinstance(window, bool)
            or not isinstance(window, int | float)
            or not math.isfinite(window)
            or window <= 0
        ):
            raise ValueError(
                f"window_seconds must be a finite number of seconds above 0, got {window!r}"
            )


@dataclass(frozen=True, kw_only=True)
class Admission:
    """The outcome of `Limiter.admit_request`.

    `retry_after` is the number of seconds until the current window ends, when both counters
    start again from zero. It is set whether or not the request was allowed.
    """

    decision: Decision
    retry_after: float

    @property
    def retry_after_header(self) -> str:
        """The value of an HTTP Retry-After header: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


@dataclass(frozen=True)
class _Window:
    index: int
    remaining: float

    @property
    def ttl_milliseconds(self) -> int:
        return math.ceil((self.remaining + TTL_MARGIN_SECONDS) * 1000)


class Limiter:
    """Request and byte counters of the agents on one host, shared through Redis.

    `client` is a `redis.asyncio.Redis` client, which may decode responses or not. `clock`
    returns the current time in seconds. It defaults to `time.time`, because the proxy
    processes on a host must agree on where each window starts. `requests_counter` names the
    request counter in the keys, so that two limiters (HTTP requests and DNS queries) count
    separately while sharing the byte counter. Raises `ValueError` for a `host_id` that is not
    a valid host id.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        host_id: str,
        limits: RateLimits,
        clock: Callable[[], float] = time.time,
        requests_counter: str = "rate",
    ) -> None:
        try:
            _HOST_ID.validate_python(host_id)
        except ValidationError as exc:
            raise ValueError(
                f"invalid host id {host_id!r}: expected letters, digits, '_', '.' and '-', "
                "starting with a letter or digit, at most 63 characters"
            ) from exc
        self._redis = client
        self._host_id = host_id
        self._limits = limits
        self._clock = clock
        self._requests_counter = requests_counter

    @property
    def limits(self) -> RateLimits:
        """The limits this limiter applies to every agent."""
        return self._limits

    async def admit_request(self, agent_id: str) -> Admission:
        """Count one request of `agent_id` in the current window and decide whether it may proceed.

        Every call counts, allowed or not. The request is denied with `rate_limited` when it
        is over `requests_per_window`, and otherwise with `bandwidth_exceeded` when the bytes
        that `add_bytes` counted in this window are at or over `bytes_per_window`. Raises
        `ValueError` for an invalid agent id, and `StoreError` when Redis fails, which the
        proxy must turn into a denial with `limiter_unavailable`.
        """
        _check_agent_id(agent_id)
        window = self._window()
        rate_key = self._key(self._requests_counter, agent_id, window)
        bytes_key = self._key("bytes", agent_id, window)

        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(rate_key)
                pipe.pexpire(rate_key, window.ttl_milliseconds)
                pipe.get(bytes_key)
                count, _, raw_bytes = await pipe.execute()
        except RedisError as exc:
            raise StoreError(
                f"cannot count a request of agent {agent_id!r} in Redis key {rate_key!r}: {exc}"
            ) from exc

        used_bytes = _parse_counter(agent_id, bytes_key, raw_bytes)
        return Admission(
            decision=self._decide(agent_id, int(count), used_bytes),
            retry_after=window.remaining,
        )

    async def add_bytes(self, agent_id: str, count: int) -> None:
        """Add `count` bytes that `agent_id` sent or received to its current window.

        A count of 0 changes nothing and sends nothing to Redis. Raises `ValueError` for an
        invalid agent id or a count that is not an integer of at least 0, and `StoreError`
        when Redis fails.
        """
        _check_agent_id(agent_id)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"byte count must be an integer of at least 0, got {count!r}")
        if count == 0:
            return

        window = self._window()
        key = self._key("bytes", agent_id, window)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(key, count)
                pipe.pexpire(key, window.ttl_milliseconds)
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(
                f"cannot add {count} bytes of agent {agent_id!r} to Redis key {key!r}: {exc}"
            ) from exc

    def _window(self) -> _Window:
        now = self._clock()
        length = self._limits.window_seconds
        index = math.floor(now / length)
        # Float rounding can put `now` slightly past the computed end, and a negative TTL would
        # delete the key at once.
        remaining = max((index + 1) * length - now, 0.0)
        return _Window(index=index, remaining=remaining)

    def _key(self, counter: str, agent_id: str, window: _Window) -> str:
        return f"{KEY_PREFIX}{self._host_id}:{counter}:{agent_id}:{window.index}"

    def _decide(self, agent_id: str, count: int, used_bytes: int) -> Decision:
        limits = self._limits
        window_text = f"{limits.window_seconds:g} s window"
        if count > limits.requests_per_window:
            return Decision.deny(
                Reason.RATE_LIMITED,
                f"agent {agent_id!r} made {count} requests in this {window_text}, "
                f"the limit is {limits.requests_per_window}",
            )
        if used_bytes >= limits.bytes_per_window:
            return Decision.deny(
                Reason.BANDWIDTH_EXCEEDED,
                f"agent {agent_id!r} transferred {used_bytes} bytes in this {window_text}, "
                f"the limit is {limits.bytes_per_window}",
            )
        return Decision.allow(
            f"agent {agent_id!r} made request {count} of {limits.requests_per_window} and "
            f"transferred {used_bytes} of {limits.bytes_per_window} bytes in this {window_text}"
        )


def _check_agent_id(agent_id: str) -> None:
    # The id becomes part of a key, so anything but a well-formed id is a caller's mistake.
    try:
        _AGENT_ID.validate_python(agent_id)
    except ValidationError as exc:
        raise ValueError(
            f"invalid agent id {agent_id!r}: expected 'ag-' and 32 lowercase hex digits"
        ) from exc


def _parse_counter(agent_id: str, key: str, raw: Any) -> int:
    if raw is None:
        return 0
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    try:
        return int(text)
    except ValueError as exc:
        raise StoreError(
            f"Redis key {key!r} of agent {agent_id!r} contains {text!r}, expected an integer; "
            "delete the key so that counting starts again"
        ) from exc
