"""Tests for the supervisor's Prometheus metrics of the image cache."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.supervisor.eviction import EvictionReason
from services.supervisor.metrics import CacheCollector, CacheReading


@pytest.fixture
def collector() -> CacheCollector:
    return CacheCollector()


def scrape(collector: CacheCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample the collector exports, keyed by name and labels."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_empty_reading_exports_zeros(collector: CacheCollector) -> None:
    samples = scrape(collector)

    assert samples[("agent_runner_image_cache_entries", ())] == 0
    assert samples[("agent_runner_image_cache_bytes", ())] == 0
    assert samples[("agent_runner_image_cache_hits_total", ())] == 0
    for reason in ("size", "age", "purge"):
        assert samples[("agent_runner_image_cache_evictions_total", (("reason", reason),))] == 0


def test_reading_exported(collector: CacheCollector) -> None:
    collector.reading = CacheReading(
        entries=3,
        size=3000,
        max_size=4096,
        in_use=1,
        hits=5,
        misses=2,
        evictions={EvictionReason.SIZE: 4, EvictionReason.PURGE: 1},
    )

    samples = scrape(collector)

    assert samples[("agent_runner_image_cache_entries", ())] == 3
    assert samples[("agent_runner_image_cache_bytes", ())] == 3000
    assert samples[("agent_runner_image_cache_max_bytes", ())] == 4096
    assert samples[("agent_runner_image_cache_in_use_entries", ())] == 1
    assert samples[("agent_runner_image_cache_hits_total", ())] == 5
    assert samples[("agent_runner_image_cache_misses_total", ())] == 2
    assert samples[("agent_runner_image_cache_evictions_total", (("reason", "size"),))] == 4
    assert samples[("agent_runner_image_cache_evictions_total", (("reason", "age"),))] == 0
    assert samples[("agent_runner_image_cache_evictions_total", (("reason", "purge"),))] == 1
