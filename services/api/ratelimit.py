"""Token-bucket rate limits of the gateway, shared through Redis, with a local fallback.

The gateway's access middleware builds the list of buckets a request draws from (its client
address, its API key, the global bucket, and the client address's failed-authentication
bucket) and calls `RateLimiter.take` once. A Lua script refills and checks every bucket and
takes the tokens in one call, atomically, so concurrent requests on several gateway
processes never overdraw a bucket. The calls of the requests that arrive in one turn of the
event loop share one pipeline (services/api/redis_batch.py). The script reads the time from
Redis, so the processes need no synchronised clocks.

A bucket contains up to `burst` tokens and gains `rate` tokens per second. A request is
allowed when every bucket it names contains at least one whole token. It then takes `cost`
tokens from each: 1, or 0 for a bucket that must only not be empty. A denied request takes
nothing. Keys
(`<prefix>` is `--rate-limit-key-prefix`):

- `<prefix>client:<address>`, `<prefix>key:<key id>`, `<prefix>global` and
  `<prefix>auth-failures:<address>`: hashes of `tokens` and `ts` (seconds). Each expires once
  it would be full again, which is the same as not existing.

When Redis fails or does not answer within `REDIS_TIMEOUT_SECONDS`, the same buckets are
kept in this process's memory for `REDIS_RETRY_SECONDS` before Redis is tried again. Limits
then still hold per gateway process, but are not shared between processes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from libs.common.settings import CommonSettings
from services.api.redis_batch import CommandBatcher, ScriptBatcher

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "agent-runner:api:rate:"
# A limiter call waits at most this long for Redis before the request is decided locally.
REDIS_TIMEOUT_SECONDS = 0.5
# After a Redis failure, requests are decided locally for this long before Redis is tried.
REDIS_RETRY_SECONDS = 1.0
# Buckets kept in memory while Redis is down; beyond it the least recently used is dropped,
# which gives that client a full bucket again.
MAX_LOCAL_BUCKETS = 100_000
# Keys outlive the moment their bucket is full by this margin, for clock steps on the server.
TTL_MARGIN_MILLISECONDS = 1000

# KEYS: the buckets. ARGV[1]: the time in seconds, or "" for the Redis server's clock. Then
# rate, burst and cost for each bucket. Returns 1 or 0 (allowed) and each bucket's tokens
# after the request as text, because Redis would truncate a Lua number to an integer.
_TAKE_SCRIPT = """
local now
if ARGV[1] == '' then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local levels = {}
local allowed = 1
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local tokens = burst
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local stored = tonumber(state[1])
  local updated = tonumber(state[2])
  if stored and updated then
    tokens = math.min(burst, stored + math.max(0, now - updated) * rate)
  end
  levels[i] = tokens
  if tokens < math.max(cost, 1) then
    allowed = 0
  end
end
local result = {allowed}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  if allowed == 1 and cost > 0 then
    levels[i] = levels[i] - cost
    redis.call('HSET', key, 'tokens', string.format('%.17g', levels[i]),
      'ts', string.format('%.17g', now))
    redis.call('PEXPIRE', key, math.ceil((burst - levels[i]) / rate * 1000) + ARGV[#ARGV])
  end
  result[i + 1] = string.format('%.17g', levels[i])
end
return result
"""


class BucketKind(StrEnum):
    """Kind of bucket, which is also the first part of its key."""

    CLIENT = "client"
    KEY = "key"
    GLOBAL = "global"
    AUTH_FAILURES = "auth-failures"


@dataclass(frozen=True, kw_only=True)
class BucketSpec:
    """Size of a bucket: `burst` tokens at most, refilled at `rate` tokens per second.

    Raises ValueError naming the value when either is not a finite number above zero.
    """

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not math.isfinite(self.rate) or self.rate <= 0:
            raise ValueError(f"rate must be a finite number above 0, got {self.rate!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an integer of at least 1, got {self.burst!r}")


@dataclass(frozen=True, kw_only=True)
class Charge:
    """One bucket a request draws from: which, its size, and the tokens it takes (0 or 1)."""

    kind: BucketKind
    subject: str
    spec: BucketSpec
    cost: int = 1

    @property
    def name(self) -> str:
        """The bucket's name, which is also the end of its Redis key."""
        return self.kind.value if self.kind is BucketKind.GLOBAL else f"{self.kind}:{self.subject}"


@dataclass(frozen=True)
class Level:
    """The tokens left in one bucket after a request, and what follows from them."""

    charge: Charge
    tokens: float

    @property
    def remaining(self) -> int:
        """Whole tokens left: how many more requests the bucket allows right now."""
        return max(0, math.floor(self.tokens))

    @property
    def reset_seconds(self) -> float:
        """Seconds until the bucket is full again."""
        spec = self.charge.spec
        return max(0.0, (spec.burst - self.tokens) / spec.rate)

    @property
    def retry_seconds(self) -> float:
        """Seconds until the bucket contains one whole token; 0 when it does now."""
        return max(0.0, (1 - self.tokens) / self.charge.spec.rate)

    @property
    def empty(self) -> bool:
        """Whether the bucket denies a request now."""
        return self.tokens < 1


class Backend(StrEnum):
    """Store in which a decision was made."""

    REDIS = "redis"
    LOCAL = "local"


@dataclass(frozen=True)
class RateDecision:
    """Whether a request may proceed, and the level of each bucket it named."""

    allowed: bool
    levels: tuple[Level, ...]
    backend: Backend

    @property
    def limiting(self) -> Level | None:
        """The bucket the response headers describe.

        For a denied request, the empty bucket that takes longest to allow one again. For an
        allowed one, the bucket it took from with the fewest whole tokens left, and of
        those the one that takes longest to fill up.
        """
        if not self.allowed:
            denying = [level for level in self.levels if level.empty]
            return max(denying, key=lambda level: level.retry_seconds, default=None)
        charged = [level for level in self.levels if level.charge.cost > 0]
        return min(charged, key=lambda level: (level.remaining, -level.reset_seconds), default=None)

    @property
    def retry_after(self) -> int:
        """Whole seconds until the request could be allowed, rounded up, at least 1."""
        level = self.limiting
        return max(1, math.ceil(level.retry_seconds)) if level else 1

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Return the `X-RateLimit-*` headers, plus `Retry-After` on a denial."""
        level = self.limiting
        if level is None:
            return []
        headers = [
            (b"x-ratelimit-limit", str(level.charge.spec.burst).encode()),
            (b"x-ratelimit-remaining", str(level.remaining).encode()),
            (b"x-ratelimit-reset", str(math.ceil(level.reset_seconds)).encode()),
        ]
        if not self.allowed:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers


def refill(tokens: float, updated: float, now: float, spec: BucketSpec) -> float:
    """Return the tokens of a bucket that held `tokens` at time `updated`, at time `now`.

    A clock that went backwards adds nothing; a bucket never holds more than `burst`.
    """
    return min(float(spec.burst), tokens + max(0.0, now - updated) * spec.rate)


def admits(tokens: float, cost: int) -> bool:
    """Return whether a bucket with `tokens` lets a request that takes `cost` tokens pass."""
    return tokens >= max(cost, 1)


class LocalBuckets:
    """The buckets in this process's memory, with the same arithmetic as the Lua script."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_LOCAL_BUCKETS,
    ) -> None:
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, charges: Sequence[Charge]) -> RateDecision:
        """Decide a request that draws from `charges`, and take its tokens if it is allowed."""
        now = self._clock()
        before = []
        for charge in charges:
            stored = self._buckets.get(charge.name)
            tokens = (
                float(charge.spec.burst) if stored is None else refill(*stored, now, charge.spec)
            )
            before.append(tokens)
        allowed = all(admits(tokens, c.cost) for tokens, c in zip(before, charges, strict=True))

        levels = []
        for tokens, charge in zip(before, charges, strict=True):
            after = tokens
            if allowed and charge.cost > 0:
                after = tokens - charge.cost
                self._store(charge.name, after, now)
            levels.append(Level(charge, after))
        return RateDecision(allowed=allowed, levels=tuple(levels), backend=Backend.LOCAL)

    def _store(self, name: str, tokens: float, now: float) -> None:
        self._buckets[name] = (tokens, now)
        self._buckets.move_to_end(name)
        while len(self._buckets) > self._max_buckets:
            self._buckets.popitem(last=False)


class RedisBuckets:
    """The buckets in Redis, shared by every gateway process that uses the same key prefix.

    `clock`, when given, replaces the Redis server's clock, so that tests can step time.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._clock = clock
        self._script = ScriptBatcher(
            CommandBatcher(client, timeout=REDIS_TIMEOUT_SECONDS), _TAKE_SCRIPT
        )

    def key(self, charge: Charge) -> str:
        """Return the Redis key of `charge`'s bucket."""
        return self._prefix + charge.name

    async def take(self, charges: Sequence[Charge]) -> RateDecision:
        """Decide a request in Redis; raises RedisError when Redis fails or times out."""
        arguments: list[Any] = ["" if self._clock is None else repr(self._clock())]
        for charge in charges:
            arguments += [repr(float(charge.spec.rate)), charge.spec.burst, charge.cost]
        arguments.append(TTL_MARGIN_MILLISECONDS)
        reply = await self._script.call([self.key(charge) for charge in charges], arguments)

        allowed, *tokens = reply
        levels = tuple(
            Level(charge, float(value)) for charge, value in zip(charges, tokens, strict=True)
        )
        return RateDecision(allowed=int(allowed) == 1, levels=levels, backend=Backend.REDIS)


def connect_limiter_redis(settings: CommonSettings) -> redis.Redis:
    """Return the rate limiter's Redis client, which never retries.

    It connects within REDIS_TIMEOUT_SECONDS, and RedisBuckets bounds each pipeline of script
    calls by the same time. The agent store's client waits up to --nats-timeout and retries. A
    request must not wait that long for its rate limit, because the local fallback can decide
    it at once.
    """
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return redis.Redis.from_url(
        settings.redis_url,
        password=password,
        # RedisBuckets bounds each pipeline by REDIS_TIMEOUT_SECONDS, which costs less than
        # redis-py's timer for each reply. redis-py 8 applies a 5 s read timeout unless
        # socket_timeout is None.
        socket_timeout=None,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class SharedBuckets(Protocol):
    """Buckets that every gateway process shares; RedisBuckets in production."""

    async def take(self, charges: Sequence[Charge]) -> RateDecision:
        """Decide a request; raises RedisError or OSError when the store fails."""
        ...


class RateLimiter:
    """Decide requests in Redis, and in local memory while Redis is failing.

    `on_backend_change` is called with the new backend whenever the limiter switches, for the
    audit trail.
    """

    def __init__(
        self,
        shared: SharedBuckets,
        *,
        local: LocalBuckets | None = None,
        retry_seconds: float = REDIS_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        on_backend_change: Callable[[Backend, str], None] | None = None,
    ) -> None:
        self._shared = shared
        self._local = local or LocalBuckets()
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._on_backend_change = on_backend_change
        self._local_until: float | None = None
        self.backend = Backend.REDIS

    async def take(self, charges: Sequence[Charge]) -> RateDecision:
        """Decide a request that draws from `charges`; never raises for a Redis failure."""
        now = self._clock()
        if self._local_until is not None and now < self._local_until:
            return self._local.take(charges)
        try:
            decision = await self._shared.take(charges)
        except (RedisError, OSError) as exc:
            self._local_until = now + self._retry_seconds
            self._switch(Backend.LOCAL, f"Redis failed: {exc}")
            return self._local.take(charges)
        self._local_until = None
        self._switch(Backend.REDIS, "Redis responded again")
        return decision

    def _switch(self, backend: Backend, detail: str) -> None:
        if backend is self.backend:
            return
        self.backend = backend
        if backend is Backend.LOCAL:
            logger.warning(
                "rate limits are counted in this process only until Redis responds again: %s",
                detail,
            )
        else:
            logger.info("rate limits are counted in Redis again")
        if self._on_backend_change is not None:
            self._on_backend_change(backend, detail)
