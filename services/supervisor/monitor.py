"""Resource monitoring of running agents: limit warnings, limit stops and final usage.

watch.py samples every ready agent once per `--monitor-interval` through `sample_all`, then
hands each sample to `assess`, which returns the warnings to emit and, when a limit was hit,
the typed stop reason. The policy per resource:

- memory: the kernel's OOM killer kills a process when the cgroup's memory limit is reached.
  The agent is stopped with `out_of_memory` as soon as the cgroup's `oom_kill` counter is
  above zero, even if the process it killed was not the container's main process. An agent
  whose container exited after an OOM kill is recorded the same way (watch.py).
- pids: a fork at the limit fails with EAGAIN and the agent keeps running. The agent is
  stopped with `pids_limit_reached` once `pids.events` counts a refused fork.
- disk: a full tmpfs returns ENOSPC and the kernel kills nothing. The agent is stopped with
  `disk_limit_reached` once `/tmp` or `/dev/shm` has no free block left.
- CPU: the CFS quota throttles an agent but never stops it. Use at the quota gets a
  limit warning, and the agent runs until its lifetime ends (`lifetime_exceeded`).

A limit warning is emitted once when use reaches `--limit-warning-fraction` of a limit and
re-armed when use drops below it again. State lives in memory, so after a supervisor restart
a warning that was already emitted may be emitted again.

Under gVisor (`--runtime=runsc`) Docker creates the same cgroups, but they hold the sandbox's
host processes: memory and CPU are the agent's plus the sandbox kernel's, and pids counts
the sandbox's host threads instead of the agent's processes. Its tmpfs mounts live inside
the sandbox kernel, where the host cannot measure them, so disk is not monitored there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from libs.common import logs
from libs.common.messages import ResourceUsage, StopReason
from services.supervisor import metrics
from services.supervisor.cgroups import CgroupReader, CgroupUnavailable, ResourceSample
from services.supervisor.settings import SupervisorSettings

logger = logging.getLogger(__name__)

# The tmpfs mounts an agent can write to; container_spec.py creates /tmp and Docker /dev/shm.
DISK_MOUNT_POINTS = ("/tmp", "/dev/shm")  # noqa: S108 - paths inside the container


class Resource(StrEnum):
    """A limited resource, as named in limit warnings and metrics."""

    MEMORY = "memory"
    CPU = "cpu"
    PIDS = "pids"
    DISK = "disk"


@dataclass(frozen=True, kw_only=True)
class LimitWarning:
    """Use of one resource passed the warning fraction of its limit.

    Units: bytes for memory and disk, CPUs for cpu, tasks for pids. `mount_point` is set for
    disk only.
    """

    resource: Resource
    usage: float
    limit: float
    fraction: float
    mount_point: str | None = None

    def details(self) -> dict[str, object]:
        """Return the audit event details."""
        details: dict[str, object] = {
            "resource": self.resource.value,
            "usage": self.usage,
            "limit": self.limit,
            "fraction": round(self.fraction, 3),
        }
        if self.mount_point is not None:
            details["mount_point"] = self.mount_point
        return details


@dataclass(frozen=True, kw_only=True)
class Assessment:
    """Warnings to emit for one sample, and the stop reason when it shows a limit hit."""

    warnings: tuple[LimitWarning, ...] = ()
    stop: StopReason | None = None
    detail: str = ""


@dataclass(kw_only=True)
class AgentWatch:
    """State that the monitor keeps for one agent between samples."""

    container_id: str
    latest: ResourceSample | None = None
    cpu_rate: float | None = None
    above: set[tuple[Resource, str]] = field(default_factory=set)
    memory_peak: int | None = None
    pids_peak: int | None = None
    disk_peaks: dict[str, int] = field(default_factory=dict)
    lifetime_warned: bool = False
    reported_errors: set[str] = field(default_factory=set)


class ResourceMonitor:
    """Sample agents' cgroups, decide warnings and limit stops, and keep usage for the record."""

    def __init__(self, settings: SupervisorSettings, *, reader: CgroupReader | None = None) -> None:
        self.fraction = settings.limit_warning_fraction
        self.lifetime_warning = timedelta(seconds=settings.lifetime_warning_seconds)
        self.reader = reader or CgroupReader(
            root=settings.cgroup_root, parent=settings.cgroup_parent
        )
        self.mount_points: tuple[str, ...] = DISK_MOUNT_POINTS
        if settings.runtime == "runsc":
            # TODO: measure gVisor's tmpfs mounts (docker exec df, or runsc's own metrics);
            # until then a full /tmp or /dev/shm under runsc returns ENOSPC but stops nothing.
            self.mount_points = ()
            logger.warning(
                "disk use of agents is not monitored under --runtime=runsc: gVisor keeps /tmp "
                "and /dev/shm inside its own kernel, so a full tmpfs is not reported and does "
                "not stop the agent"
            )
        self._agents: dict[str, AgentWatch] = {}

    def sample_all(self, containers: dict[str, str]) -> dict[str, ResourceSample]:
        """Sample each agent in `containers` (agent id -> container id), blocking briefly.

        An agent whose cgroup cannot be read is left out and logged once, so one broken
        container does not hide the others.
        """
        samples = {}
        for agent_id, container_id in containers.items():
            watch = self._watch(agent_id, container_id)
            try:
                sample = self.reader.sample(container_id, mount_points=self.mount_points)
            except CgroupUnavailable as exc:
                self._report_once(agent_id, watch, "cgroup", str(exc))
                continue
            for mount_point, detail in sample.disk_errors.items():
                self._report_once(agent_id, watch, mount_point, detail)
            samples[agent_id] = sample
        return samples

    def sample_one(self, agent_id: str, container_id: str) -> None:
        """Take a last sample before a container is stopped, so the record shows final usage.

        A container that already exited has no cgroup left, so its earlier samples stand.
        """
        try:
            sample = self.reader.sample(container_id, mount_points=self.mount_points)
        except CgroupUnavailable as exc:
            logger.debug("no final sample of agent %s: %s", agent_id, exc)
            return
        self._watch(agent_id, container_id)
        self.assess(agent_id, sample)

    def assess(self, agent_id: str, sample: ResourceSample) -> Assessment:
        """Fold `sample` into the agent's state and return the warnings and stop it calls for."""
        watch = self._watch(agent_id, None)
        previous = watch.latest
        watch.latest = sample
        watch.memory_peak = max(watch.memory_peak or 0, sample.memory.max_usage)
        pids_seen = sample.pids.peak if sample.pids.peak is not None else sample.pids.current
        watch.pids_peak = max(watch.pids_peak or 0, pids_seen)
        for disk in sample.disks:
            watch.disk_peaks[disk.mount_point] = max(
                watch.disk_peaks.get(disk.mount_point, 0), disk.used
            )
        if previous is not None and sample.monotonic > previous.monotonic:
            used = sample.cpu.usage_seconds - previous.cpu.usage_seconds
            watch.cpu_rate = max(0.0, used / (sample.monotonic - previous.monotonic))

        warnings = [
            warning
            for warning in self._crossings(watch, sample)
            if self._arm(watch, warning.resource, warning.mount_point or "", warning.fraction)
        ]
        stop, detail = _limit_stop(sample)
        return Assessment(warnings=tuple(warnings), stop=stop, detail=detail)

    def lifetime_warning_due(self, agent_id: str, expires_at: datetime, now: datetime) -> bool:
        """Return True once when `now` is within --lifetime-warning-seconds of `expires_at`."""
        if not self.lifetime_warning:
            return False
        watch = self._watch(agent_id, None)
        if watch.lifetime_warned or now < expires_at - self.lifetime_warning:
            return False
        watch.lifetime_warned = True
        return True

    def usage(self, agent_id: str) -> ResourceUsage | None:
        """Return the usage measured for the agent so far, or None when it was never sampled."""
        watch = self._agents.get(agent_id)
        if watch is None or watch.latest is None:
            return None
        latest = watch.latest
        return ResourceUsage(
            memory_peak_bytes=watch.memory_peak,
            cpu_seconds=round(latest.cpu.usage_seconds, 3),
            pids_peak=watch.pids_peak,
            disk_peak_bytes=dict(watch.disk_peaks),
            oom_kills=latest.memory.oom_kills,
            pids_limit_hits=latest.pids.limit_hits,
        )

    def forget(self, agent_id: str) -> None:
        """Drop an agent's state and metric series once its container is gone."""
        watch = self._agents.pop(agent_id, None)
        if watch is not None:
            self.reader.forget(watch.container_id)
        self.publish()

    def publish(self) -> None:
        """Hand the latest sample of every agent to the metrics collector."""
        metrics.AGENT_RESOURCES.readings = {
            agent_id: metrics.AgentReading(sample=watch.latest, cpu_rate=watch.cpu_rate)
            for agent_id, watch in self._agents.items()
            if watch.latest is not None
        }

    def _crossings(self, watch: AgentWatch, sample: ResourceSample) -> list[LimitWarning]:
        readings: list[tuple[Resource, str | None, float, float | None]] = [
            (Resource.MEMORY, None, sample.memory.working_set, sample.memory.limit),
            (Resource.PIDS, None, sample.pids.current, sample.pids.limit),
            (Resource.CPU, None, watch.cpu_rate or 0.0, sample.cpu.limit_cpus),
        ]
        readings += [
            (Resource.DISK, disk.mount_point, disk.used, disk.size) for disk in sample.disks
        ]
        warnings = []
        for resource, mount_point, usage, limit in readings:
            if not limit:
                continue
            warnings.append(
                LimitWarning(
                    resource=resource,
                    usage=usage,
                    limit=limit,
                    fraction=usage / limit,
                    mount_point=mount_point,
                )
            )
        return warnings

    def _arm(
        self, watch: AgentWatch, resource: Resource, mount_point: str, fraction: float
    ) -> bool:
        """Return True when this reading newly crossed the warning fraction."""
        key = (resource, mount_point)
        if fraction < self.fraction:
            watch.above.discard(key)
            return False
        if key in watch.above:
            return False
        watch.above.add(key)
        return True

    def _watch(self, agent_id: str, container_id: str | None) -> AgentWatch:
        watch = self._agents.get(agent_id)
        if watch is None or (container_id is not None and watch.container_id != container_id):
            if watch is not None:
                self.reader.forget(watch.container_id)
            watch = AgentWatch(container_id=container_id or "")
            self._agents[agent_id] = watch
        return watch

    def _report_once(self, agent_id: str, watch: AgentWatch, key: str, detail: str) -> None:
        if key in watch.reported_errors:
            return
        watch.reported_errors.add(key)
        logger.warning(
            "cannot monitor %s of agent %s: %s; its limits are still enforced by the kernel "
            "but not reported",
            key,
            agent_id,
            detail,
            extra={logs.AGENT_ID: agent_id, logs.CONTAINER_ID: watch.container_id},
        )


def _limit_stop(sample: ResourceSample) -> tuple[StopReason | None, str]:
    """Return the stop reason for a limit that `sample` shows was hit, most severe first."""
    if sample.memory.oom_kills > 0:
        return (
            StopReason.OUT_OF_MEMORY,
            f"the OOM killer killed {sample.memory.oom_kills} process(es) at the memory limit "
            f"of {sample.memory.limit} bytes",
        )
    if sample.pids.limit_hits > 0:
        return (
            StopReason.PIDS_LIMIT_REACHED,
            f"{sample.pids.limit_hits} fork(s) refused at the pids limit of {sample.pids.limit}",
        )
    for disk in sample.disks:
        if disk.available <= 0 and disk.size > 0:
            return (
                StopReason.DISK_LIMIT_REACHED,
                f"{disk.mount_point} is full ({disk.used} of {disk.size} bytes)",
            )
    return None, ""
