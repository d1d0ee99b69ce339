"""Tests for the choice of cached images to evict: order, limits, in-use images and ages."""

from __future__ import annotations

from collections.abc import Set
from datetime import UTC, datetime, timedelta

import pytest

from services.supervisor.eviction import (
    CacheEntry,
    EvictionReason,
    choose_evictions,
    least_recently_used,
)

NOW = datetime(2025, 1, 10, 12, 0, tzinfo=UTC)
MAX_AGE = timedelta(days=7)
SIZE = EvictionReason.SIZE
AGE = EvictionReason.AGE


def digest(name: str) -> str:
    """Return a valid-looking digest that starts with `name`'s bytes in hex."""
    return "sha256:" + name.encode().hex().ljust(64, "0")


def entry(name: str, size: int, *, used_ago: timedelta) -> CacheEntry:
    """Return the cache entry of image `name`, last used `used_ago` before NOW."""
    return CacheEntry(
        digest=digest(name),
        size=size,
        image_id=f"sha256:{'f' * 63}{len(name)}",
        first_used=NOW - used_ago - timedelta(hours=1),
        last_used=NOW - used_ago,
    )


def minutes(count: int) -> timedelta:
    return timedelta(minutes=count)


def chosen(
    entries: list[CacheEntry],
    *,
    max_size: int,
    in_use: Set[str] = frozenset(),
    max_age: timedelta = MAX_AGE,
) -> list[tuple[str, EvictionReason]]:
    """Return (digest, reason) of each eviction, in the order chosen."""
    evictions = choose_evictions(
        entries,
        in_use={digest(name) for name in in_use},
        max_size=max_size,
        max_age=max_age,
        now=NOW,
    )
    return [(eviction.digest, eviction.reason) for eviction in evictions]


# Three images of 100 bytes each, "a" used longest ago, "c" most recently.
ABC = [
    entry("b", 100, used_ago=minutes(20)),
    entry("a", 100, used_ago=minutes(30)),
    entry("c", 100, used_ago=minutes(10)),
]


@pytest.mark.parametrize(
    ("max_size", "in_use", "expected"),
    [
        pytest.param(300, set(), [], id="at-limit-keeps-all"),
        pytest.param(1000, set(), [], id="under-limit-keeps-all"),
        pytest.param(299, set(), [("a", SIZE)], id="one-byte-over-evicts-oldest"),
        pytest.param(150, set(), [("a", SIZE), ("b", SIZE)], id="evicts-in-lru-order"),
        pytest.param(0, set(), [("a", SIZE), ("b", SIZE), ("c", SIZE)], id="zero-evicts-all"),
        pytest.param(200, {"a"}, [("b", SIZE)], id="in-use-oldest-skipped"),
        pytest.param(100, {"a", "b"}, [("c", SIZE)], id="in-use-counts-towards-total"),
        pytest.param(0, {"a", "b", "c"}, [], id="all-in-use-none-evicted"),
        pytest.param(150, {"b", "c"}, [("a", SIZE)], id="over-limit-with-in-use-left"),
    ],
)
def test_size_evictions(max_size: int, in_use: set[str], expected: list[tuple[str, str]]) -> None:
    result = chosen(ABC, max_size=max_size, in_use=in_use)

    assert result == [(digest(name), reason) for name, reason in expected]


def test_empty_cache_evicts_nothing() -> None:
    assert chosen([], max_size=0) == []


def test_large_entry_evicted_before_newer_small() -> None:
    entries = [
        entry("small-old", 10, used_ago=minutes(50)),
        entry("big", 500, used_ago=minutes(40)),
        entry("small-new", 10, used_ago=minutes(1)),
    ]

    result = chosen(entries, max_size=100)

    assert result == [(digest("small-old"), SIZE), (digest("big"), SIZE)]


@pytest.mark.parametrize(
    ("used_ago", "expected"),
    [
        pytest.param(MAX_AGE, [], id="exactly-max-age-kept"),
        pytest.param(MAX_AGE + timedelta(seconds=1), [("old", AGE)], id="older-evicted"),
        pytest.param(MAX_AGE - timedelta(seconds=1), [], id="younger-kept"),
    ],
)
def test_age_boundary(used_ago: timedelta, expected: list[tuple[str, str]]) -> None:
    result = chosen([entry("old", 1, used_ago=used_ago)], max_size=1000)

    assert result == [(digest(name), reason) for name, reason in expected]


def test_old_in_use_image_kept() -> None:
    old = entry("old", 1, used_ago=timedelta(days=30))

    assert chosen([old], max_size=0, in_use={"old"}) == []


def test_age_evictions_come_first_and_free_space() -> None:
    entries = [
        entry("aged-1", 100, used_ago=timedelta(days=9)),
        entry("aged-2", 100, used_ago=timedelta(days=8)),
        entry("recent-1", 100, used_ago=minutes(20)),
        entry("recent-2", 100, used_ago=minutes(10)),
    ]

    result = chosen(entries, max_size=150)

    assert result == [
        (digest("aged-1"), AGE),
        (digest("aged-2"), AGE),
        (digest("recent-1"), SIZE),
    ]


def test_small_max_age_evicts_all_unused() -> None:
    result = chosen(ABC, max_size=1000, in_use={"c"}, max_age=timedelta(minutes=15))

    assert result == [(digest("a"), AGE), (digest("b"), AGE)]


def test_eviction_carries_size_and_image_id() -> None:
    old = entry("a", 123, used_ago=minutes(5))

    (eviction,) = choose_evictions([old], in_use=set(), max_size=0, max_age=MAX_AGE, now=NOW)

    assert eviction.size == 123
    assert eviction.image_id == old.image_id
    assert eviction.digest == old.digest


def test_equal_last_use_ordered_by_digest() -> None:
    same_time = [entry(name, 100, used_ago=minutes(5)) for name in ("y", "x", "z")]

    ordered = least_recently_used(same_time)
    result = chosen(same_time, max_size=100)

    assert [item.digest for item in ordered] == [digest("x"), digest("y"), digest("z")]
    assert result == [(digest("x"), SIZE), (digest("y"), SIZE)]
