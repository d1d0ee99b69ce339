"""Prometheus metrics of the supervisor, served on an internal address only (`--metrics-port`).

The image cache's numbers live in Redis, so that they survive a restart. The cache manager
hands each new reading to `CACHE`, and a scrape returns the latest reading. The counters
therefore keep counting across restarts of the supervisor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.supervisor.eviction import EvictionReason

REGISTRY = CollectorRegistry()


@dataclass(frozen=True, kw_only=True)
class CacheReading:
    """The image cache's size and totals at one moment."""

    entries: int = 0
    size: int = 0
    max_size: int = 0
    in_use: int = 0
    hits: int = 0
    misses: int = 0
    evictions: dict[EvictionReason, int] = field(default_factory=dict)


class CacheCollector(Collector):
    """Export the latest CacheReading; replacing `reading` is atomic, so any thread may."""

    def __init__(self) -> None:
        self.reading = CacheReading()

    def collect(self) -> Iterator[Metric]:
        """Yield the cache metrics of the latest reading."""
        reading = self.reading

        yield _gauge("agent_runner_image_cache_entries", "Images in the cache.", reading.entries)
        yield _gauge(
            "agent_runner_image_cache_bytes", "Total size of cached tarballs.", reading.size
        )
        yield _gauge(
            "agent_runner_image_cache_max_bytes",
            "Size above which unused images are evicted (--cache-max-size).",
            reading.max_size,
        )
        yield _gauge(
            "agent_runner_image_cache_in_use_entries",
            "Cached images that an agent of this host uses, which are never evicted.",
            reading.in_use,
        )

        hits = CounterMetricFamily(
            "agent_runner_image_cache_hits",
            "Starts whose image came from the cache or was already loaded.",
        )
        hits.add_metric([], reading.hits)
        yield hits
        misses = CounterMetricFamily(
            "agent_runner_image_cache_misses", "Starts whose image had to be downloaded."
        )
        misses.add_metric([], reading.misses)
        yield misses
        evictions = CounterMetricFamily(
            "agent_runner_image_cache_evictions",
            "Images evicted from the cache, by reason (size, age or purge).",
            labels=["reason"],
        )
        for reason in EvictionReason:
            evictions.add_metric([reason.value], reading.evictions.get(reason, 0))
        yield evictions


CACHE = CacheCollector()
REGISTRY.register(CACHE)
VERIFICATION_FAILURES = Counter(
    "agent_runner_image_verification_failures",
    "Image starts rejected by a download, signature, tarball or load check, by reason code.",
    labelnames=["reason"],
    registry=REGISTRY,
)


def serve(address: str, port: int) -> None:
    """Serve the metrics over HTTP on `address:port` from a background thread."""
    start_http_server(port, addr=address, registry=REGISTRY)


def _gauge(name: str, documentation: str, value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
