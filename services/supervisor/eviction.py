"""Choice of the cached images to evict, made from the cache entries alone.

The cache manager (services/supervisor/cache_manager.py) calls `choose_evictions` with the
entries it reads from Redis and the digests that agents of this host use, and removes what it
returns.
Keeping the choice a pure function lets the unit tests cover every ordering and limit without
Docker or Redis.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class EvictionReason(StrEnum):
    """Reason an image left the cache; the same code goes to logs, audit and metrics."""

    SIZE = "size"
    AGE = "age"
    PURGE = "purge"


@dataclass(frozen=True, kw_only=True)
class CacheEntry:
    """One cached image: its tarball size in bytes, image ID and use history (UTC)."""

    digest: str
    size: int
    image_id: str
    first_used: datetime
    last_used: datetime
    hits: int = 0
    misses: int = 0


@dataclass(frozen=True, kw_only=True)
class Eviction:
    """One entry to evict, and why."""

    digest: str
    size: int
    image_id: str
    reason: EvictionReason


def least_recently_used(entries: Iterable[CacheEntry]) -> list[CacheEntry]:
    """Return `entries` oldest last use first; the digest breaks ties, so the order is stable."""
    return sorted(entries, key=lambda entry: (entry.last_used, entry.digest))


def choose_evictions(
    entries: Iterable[CacheEntry],
    *,
    in_use: Set[str],
    max_size: int,
    max_age: timedelta,
    now: datetime,
) -> list[Eviction]:
    """Return the entries to evict, in eviction order, each with its reason.

    First every entry whose last use is more than `max_age` before `now` (reason age), then
    the least recently used of the rest until their total size is at most `max_size` bytes
    (reason size). A digest in `in_use` is never chosen but still counts towards the total,
    so the total stays over `max_size` when in-use images alone exceed it.
    """
    ordered = least_recently_used(entries)
    evictions: list[Eviction] = []
    remaining: list[CacheEntry] = []
    for entry in ordered:
        if entry.digest not in in_use and now - entry.last_used > max_age:
            evictions.append(_eviction(entry, EvictionReason.AGE))
        else:
            remaining.append(entry)

    total = sum(entry.size for entry in remaining)
    for entry in remaining:
        if total <= max_size:
            break
        if entry.digest in in_use:
            continue
        evictions.append(_eviction(entry, EvictionReason.SIZE))
        total -= entry.size
    return evictions


def _eviction(entry: CacheEntry, reason: EvictionReason) -> Eviction:
    return Eviction(digest=entry.digest, size=entry.size, image_id=entry.image_id, reason=reason)
