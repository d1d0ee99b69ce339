"""State of one host's image cache in Redis: entries, use history and totals.

The tarballs themselves stay on the host's disk (ImageStore). Redis contains what the
eviction needs to choose and what operators read, so that it survives a supervisor restart.
Keys, with `<p>` = `agent-runner:cache:<host>:`:

- `<p>entry:<digest>`: hash with `size` (tarball bytes, 0 when only the loaded image is
  left), `image_id`, `first_used` and `last_used` (ISO 8601, UTC), `hits` and `misses`.
- `<p>lru`: sorted set of the cached digests, scored by last use (Unix seconds).
- `<p>stats`: hash of totals since the state was created: `hits`, `misses` and
  `evictions:<reason>`.
- `agent-runner:cache-hosts` (CACHE_HOSTS_KEY): the hosts that have at least one entry,
  which the gateway asks when it purges every host.

Only the supervisor of `<host>` writes these keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis.asyncio as redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from libs.common.errors import StoreError
from libs.common.store import CACHE_HOSTS_KEY, PREFIX
from services.supervisor.eviction import CacheEntry, EvictionReason

# Deletes one entry, counts its eviction and drops the host from the host set once its last
# entry is gone, all at once, so a concurrent use can never leave a host with entries out of
# the set. Returns 1 when the entry existed.
_REMOVE_SCRIPT = """
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
if removed == 1 and ARGV[2] ~= '' then
  redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
end
if redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[4], ARGV[3])
end
return removed
"""


@dataclass(frozen=True, kw_only=True)
class CacheTotals:
    """Counts of cache uses and evictions since the host's cache state was created."""

    hits: int = 0
    misses: int = 0
    evictions: dict[EvictionReason, int] = field(default_factory=dict)


class CacheState:
    """Read and write one host's cache state; Redis errors become StoreError."""

    def __init__(self, client: redis.Redis, *, host_id: str) -> None:
        self._redis = client
        self._host_id = host_id
        self._prefix = f"{PREFIX}cache:{host_id}:"
        self._remove_script = client.register_script(_REMOVE_SCRIPT)

    @property
    def _lru_key(self) -> str:
        return f"{self._prefix}lru"

    @property
    def _stats_key(self) -> str:
        return f"{self._prefix}stats"

    def _entry_key(self, digest: str) -> str:
        return f"{self._prefix}entry:{digest}"

    async def record_use(
        self, digest: str, *, size: int, image_id: str, hit: bool, now: datetime
    ) -> None:
        """Count one start that used `digest`: a hit when nothing was downloaded, else a miss.

        Creates the entry on its first use and updates its size and image ID on every use.
        """
        counter = "hits" if hit else "misses"
        key = self._entry_key(digest)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    key,
                    mapping={"size": size, "image_id": image_id, "last_used": now.isoformat()},
                )
                pipe.hsetnx(key, "first_used", now.isoformat())
                pipe.hincrby(key, counter, 1)
                pipe.zadd(self._lru_key, {digest: now.timestamp()})
                pipe.hincrby(self._stats_key, counter, 1)
                pipe.sadd(CACHE_HOSTS_KEY, self._host_id)
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"cannot record use of cached image {digest!r}: {exc}") from exc

    async def put(self, entry: CacheEntry) -> None:
        """Store `entry` as it is, replacing any entry of its digest; counts no use."""
        key = self._entry_key(entry.digest)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=_fields_of(entry))
                pipe.zadd(self._lru_key, {entry.digest: entry.last_used.timestamp()})
                pipe.sadd(CACHE_HOSTS_KEY, self._host_id)
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"cannot store cache entry {entry.digest!r}: {exc}") from exc

    async def remove(self, digest: str, *, reason: EvictionReason | None) -> bool:
        """Delete the entry of `digest`; return whether it existed.

        `reason` counts the removal as an eviction; None (an entry whose image is gone from
        the disk and from Docker) counts nothing.
        """
        keys = [self._entry_key(digest), self._lru_key, self._stats_key, CACHE_HOSTS_KEY]
        counter = f"evictions:{reason.value}" if reason is not None else ""
        try:
            removed = await self._remove_script(keys=keys, args=[digest, counter, self._host_id])
        except RedisError as exc:
            raise StoreError(f"cannot remove cache entry {digest!r}: {exc}") from exc
        return bool(removed)

    async def entries(self) -> list[CacheEntry]:
        """Return every entry, least recently used first.

        Raises StoreError when Redis fails or an entry does not parse.
        """
        try:
            digests = [str(digest) for digest in await self._redis.zrange(self._lru_key, 0, -1)]
            async with self._redis.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.hgetall(self._entry_key(digest))
                raws = await pipe.execute() if digests else []
        except RedisError as exc:
            raise StoreError(f"cannot read the image cache of {self._host_id!r}: {exc}") from exc
        return [self._parse(digest, raw) for digest, raw in zip(digests, raws, strict=True) if raw]

    async def get(self, digest: str) -> CacheEntry | None:
        """Return the entry of `digest`, or None when it is not cached."""
        try:
            raw = await self._redis.hgetall(self._entry_key(digest))
        except RedisError as exc:
            raise StoreError(f"cannot read cache entry {digest!r}: {exc}") from exc
        return self._parse(digest, raw) if raw else None

    async def totals(self) -> CacheTotals:
        """Return the hit, miss and eviction counts of this host."""
        try:
            raw = await self._redis.hgetall(self._stats_key)
        except RedisError as exc:
            raise StoreError(f"cannot read cache totals of {self._host_id!r}: {exc}") from exc
        try:
            return CacheTotals(
                hits=int(raw.get("hits", 0)),
                misses=int(raw.get("misses", 0)),
                evictions={
                    reason: int(raw.get(f"evictions:{reason.value}", 0))
                    for reason in EvictionReason
                },
            )
        except ValueError as exc:
            raise StoreError(f"cache totals in {self._stats_key!r} are invalid: {exc}") from exc

    def _parse(self, digest: str, raw: Mapping[bytes | str, bytes | str]) -> CacheEntry:
        # The client decodes responses, so every field and value is a str.
        fields = {str(name): str(value) for name, value in raw.items()}
        try:
            return CacheEntry(
                digest=digest,
                size=int(fields["size"]),
                image_id=fields.get("image_id", ""),
                first_used=_parse_time(fields["first_used"]),
                last_used=_parse_time(fields["last_used"]),
                hits=int(fields.get("hits", 0)),
                misses=int(fields.get("misses", 0)),
            )
        except (KeyError, ValueError) as exc:
            raise StoreError(
                f"cache entry {self._entry_key(digest)!r} is invalid: {exc!r}; delete the key "
                "and restart the supervisor, which adopts the tarball again"
            ) from exc


def _fields_of(entry: CacheEntry) -> dict[FieldT, EncodableT]:
    return {
        "size": entry.size,
        "image_id": entry.image_id,
        "first_used": entry.first_used.isoformat(),
        "last_used": entry.last_used.isoformat(),
        "hits": entry.hits,
        "misses": entry.misses,
    }


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no UTC offset")
    return parsed.astimezone(UTC)
