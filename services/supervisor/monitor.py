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
host processes: memory and CPU are the agent's plus the sandbox kernel's, and the pids cgroup
counts the sandbox's host threads. The agent's process limit is RLIMIT_NPROC inside gVisor,
where a fork at the limit fails with EAGAIN and nothing is counted on the host, so the
monitor reads the agent's task count from gVisor (gvisor_stats.py) and stops the agent with
`pids_limit_reached` once the count is at the limit. A count costs a runsc run, so it is
refreshed only when the sandbox's host threads changed, when the last count was at or above
the warning fraction, or every TASK_REFRESH_ROUNDS rounds. /tmp and /dev/shm are host tmpfs
volumes under runsc (gvisor_options.py) and are measured on the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

from libs.common import logs
from libs.common.messages import ResourceUsage, StopReason
from services.supervisor import metrics
from services.supervisor.cgroups import (
    CgroupReader,
    CgroupUnavailable,
    PidsReading,
    ResourceSample,
)
from services.supervisor.gvisor_stats import GvisorStatsUnavailable, GvisorTasks
from services.supervisor.settings import SupervisorSettings

logger = logging.getLogger(__name__)

# The tmpfs mounts an agent can write to; container_spec.py creates /tmp and Docker /dev/shm.
DISK_MOUNT_POINTS = ("/tmp", "/dev/shm")  # noqa: S108 - paths inside the container
# Under runsc, rounds after which gVisor's task count of an agent is read again even when
# nothing suggests that it moved.
TASK_REFRESH_ROUNDS = 30


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
    # Under runsc: gVisor's last task count, the host thread count when it was requested, and
    # the rounds since then. The last field is the host thread count at the pending request.
    tasks: int | None = None
    tasks_host_pids: int | None = None
    tasks_age: int = 0
    tasks_requested_host_pids: int | None = None


class ResourceMonitor:
    """Sample agents' cgroups, decide warnings and limit stops, and keep usage for the record."""

    def __init__(
        self,
        settings: SupervisorSettings,
        *,
        reader: CgroupReader | None = None,
        mount_sources: Callable[[str], dict[str, str]] | None = None,
        tasks: GvisorTasks | None = None,
    ) -> None:
        """`mount_sources` names a container's volume folders; runsc needs it for disk use."""
        self.fraction = settings.limit_warning_fraction
        self.lifetime_warning = timedelta(seconds=settings.lifetime_warning_seconds)
        self.mount_points: tuple[str, ...] = DISK_MOUNT_POINTS
        self.tasks: GvisorTasks | None = None
        self.nproc_limit = settings.container_pids_limit
        if settings.runtime == "runsc":
            self.tasks = tasks or GvisorTasks(
                runsc=settings.runsc_binary, root=settings.runsc_state_root
            )
            if mount_sources is None and reader is None:
                self.mount_points = ()
                logger.warning(
                    "disk use of agents is not monitored: under --runtime=runsc it is read "
                    "from the agents' volumes, and this monitor was given no way to find them"
                )
        self.reader = reader or CgroupReader(
            root=settings.cgroup_root,
            parent=settings.cgroup_parent,
            mount_sources=mount_sources if settings.runtime == "runsc" else None,
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
            samples[agent_id] = self._agent_tasks(agent_id, watch, sample)
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
        watch = self._watch(agent_id, container_id)
        # The container is about to stop, so a new runsc run would only be cancelled.
        self.assess(agent_id, self._agent_tasks(agent_id, watch, sample, refresh=False))

    def _agent_tasks(
        self, agent_id: str, watch: AgentWatch, sample: ResourceSample, *, refresh: bool = True
    ) -> ResourceSample:
        """Under runsc, put gVisor's count of the agent's tasks in place of the host's.

        The limit becomes the agent's RLIMIT_NPROC. Forks refused at the sandbox's own host
        limit stay counted, because gVisor fails when its threads reach that limit. A count
        requested in one round arrives in a later one, and `refresh` False requests none. When
        runsc fails, the last count is used, or the host's reading when there is none.
        """
        if self.tasks is None:
            return sample
        container_id = watch.container_id
        try:
            count = self.tasks.result(container_id)
        except GvisorStatsUnavailable as exc:
            self._report_once(agent_id, watch, "gvisor tasks", str(exc))
        else:
            if count is not None:
                watch.tasks = count
                watch.tasks_host_pids = watch.tasks_requested_host_pids
                watch.tasks_age = 0
        watch.tasks_age += 1
        host_pids = sample.pids.current
        due = (
            watch.tasks is None
            or host_pids != watch.tasks_host_pids
            or watch.tasks >= self.fraction * self.nproc_limit
            or watch.tasks_age > TASK_REFRESH_ROUNDS
        )
        if refresh and due:
            try:
                if self.tasks.start(container_id):
                    watch.tasks_requested_host_pids = host_pids
            except GvisorStatsUnavailable as exc:
                self._report_once(agent_id, watch, "gvisor tasks", str(exc))
        if watch.tasks is None:
            return sample
        pids = PidsReading(
            current=watch.tasks,
            limit=self.nproc_limit,
            peak=None,
            limit_hits=sample.pids.limit_hits,
        )
        return replace(sample, pids=pids)

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
            self._forget_container(watch.container_id)
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
                self._forget_container(watch.container_id)
            watch = AgentWatch(container_id=container_id or "")
            self._agents[agent_id] = watch
        return watch

    def _forget_container(self, container_id: str) -> None:
        self.reader.forget(container_id)
        if self.tasks is not None:
            self.tasks.cancel(container_id)

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
    if sample.pids.limit is not None and sample.pids.current >= sample.pids.limit:
        # Under runsc a refused fork is not counted anywhere the host can read, and at the
        # limit the next fork fails.
        return (
            StopReason.PIDS_LIMIT_REACHED,
            f"{sample.pids.current} tasks at the pids limit of {sample.pids.limit}",
        )
    for disk in sample.disks:
        if disk.available <= 0 and disk.size > 0:
            return (
                StopReason.DISK_LIMIT_REACHED,
                f"{disk.mount_point} is full ({disk.used} of {disk.size} bytes)",
            )
    return None, ""
