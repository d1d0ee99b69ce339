"""Prometheus metrics of the supervisor, served on an internal address only (`--metrics-port`).

The image cache's numbers live in Redis, so that they survive a restart. The cache manager
hands each new reading to `CACHE`, and a scrape returns the latest reading. The counters
therefore keep counting across restarts of the supervisor.

Per-agent resource gauges carry an `agent_id` label. The resource monitor replaces
`AGENT_RESOURCES.readings` after every sampling round and drops an agent once its container
is gone, so the number of series stays bounded by the number of running agents.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.supervisor.cgroups import ResourceSample
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


LIMIT_WARNINGS = Counter(
    "agent_runner_agent_limit_warnings",
    "agent.limit_warning events, by resource (memory, cpu, pids or disk).",
    labelnames=["resource"],
    registry=REGISTRY,
)
AGENT_STOPS = Counter(
    "agent_runner_agent_stops",
    "Agents stopped, by typed stop reason such as out_of_memory or lifetime_exceeded.",
    labelnames=["reason"],
    registry=REGISTRY,
)


@dataclass(frozen=True, kw_only=True)
class AgentReading:
    """The latest sample of one agent and its CPU use over the last interval (CPUs)."""

    sample: ResourceSample
    cpu_rate: float | None


class AgentResourceCollector(Collector):
    """Export the latest sample of each running agent; `readings` is replaced whole."""

    def __init__(self) -> None:
        self.readings: dict[str, AgentReading] = {}

    def collect(self) -> Iterator[Metric]:
        """Yield one series per agent (and per tmpfs mount for disk) of the latest readings."""
        readings = self.readings
        families = {
            name: GaugeMetricFamily(name, documentation, labels=["agent_id"])
            for name, documentation in _AGENT_GAUGES.items()
        }
        cpu_total = CounterMetricFamily(
            "agent_runner_agent_cpu_seconds", "CPU time the agent used.", labels=["agent_id"]
        )
        throttled = CounterMetricFamily(
            "agent_runner_agent_cpu_throttled_seconds",
            "Time the agent's tasks waited because the CPU quota was used up.",
            labels=["agent_id"],
        )
        disk_used = GaugeMetricFamily(
            "agent_runner_agent_disk_bytes",
            "Bytes used on an agent's tmpfs mount.",
            labels=["agent_id", "mount_point"],
        )
        disk_size = GaugeMetricFamily(
            "agent_runner_agent_disk_limit_bytes",
            "Size of an agent's tmpfs mount.",
            labels=["agent_id", "mount_point"],
        )
        for agent_id, reading in readings.items():
            sample = reading.sample
            values = {
                "agent_runner_agent_memory_bytes": sample.memory.working_set,
                "agent_runner_agent_memory_max_bytes": sample.memory.max_usage,
                "agent_runner_agent_memory_limit_bytes": sample.memory.limit,
                "agent_runner_agent_memory_oom_kills": sample.memory.oom_kills,
                "agent_runner_agent_cpu_usage_cpus": reading.cpu_rate,
                "agent_runner_agent_cpu_limit_cpus": sample.cpu.limit_cpus,
                "agent_runner_agent_pids": sample.pids.current,
                "agent_runner_agent_pids_limit": sample.pids.limit,
                "agent_runner_agent_pids_limit_hits": sample.pids.limit_hits,
            }
            for name, value in values.items():
                if value is not None:
                    families[name].add_metric([agent_id], value)
            cpu_total.add_metric([agent_id], sample.cpu.usage_seconds)
            throttled.add_metric([agent_id], sample.cpu.throttled_seconds)
            for disk in sample.disks:
                disk_used.add_metric([agent_id, disk.mount_point], disk.used)
                disk_size.add_metric([agent_id, disk.mount_point], disk.size)
        yield from families.values()
        yield from (cpu_total, throttled, disk_used, disk_size)


_AGENT_GAUGES = {
    "agent_runner_agent_memory_bytes": "Agent memory use without inactive file cache, tmpfs "
    "included.",
    "agent_runner_agent_memory_max_bytes": "Highest memory use of the agent, page cache included.",
    "agent_runner_agent_memory_limit_bytes": "Memory limit of the agent.",
    "agent_runner_agent_memory_oom_kills": "Processes of the agent killed by the OOM killer.",
    "agent_runner_agent_cpu_usage_cpus": "CPUs the agent used over the last monitor interval.",
    "agent_runner_agent_cpu_limit_cpus": "CPU quota of the agent, in CPUs.",
    "agent_runner_agent_pids": "Processes and threads of the agent.",
    "agent_runner_agent_pids_limit": "Maximum processes and threads of the agent.",
    "agent_runner_agent_pids_limit_hits": "Forks of the agent refused at the pids limit.",
}

AGENT_RESOURCES = AgentResourceCollector()
REGISTRY.register(AGENT_RESOURCES)


# Set once at startup from the runtime probe (services/supervisor/runtime_probe.py).
GVISOR_AVAILABLE = Gauge(
    "agent_runner_gvisor_available",
    "1 when the startup probe ran a container under gVisor (--runtime=runsc), else 0.",
    registry=REGISTRY,
)
RUNTIME = Info(
    "agent_runner_runtime",
    "OCI runtime of agents (runtime, docker_runtime) and the startup probe's gvisor_status.",
    registry=REGISTRY,
)
# Set once at startup by the AppArmor check (services/supervisor/apparmor.py).
APPARMOR_ENFORCED = Gauge(
    "agent_runner_apparmor_enforced",
    "1 when agents run under the AppArmor profile, 0 when the kernel has no AppArmor.",
    registry=REGISTRY,
)


def serve(address: str, port: int) -> None:
    """Serve the metrics over HTTP on `address:port` from a background thread."""
    start_http_server(port, addr=address, registry=REGISTRY)


def _gauge(name: str, documentation: str, value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
