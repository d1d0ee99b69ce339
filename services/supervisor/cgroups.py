"""Read one agent container's resource use from cgroup v1 files and its tmpfs mounts.

The monitoring loop (monitor.py) calls `CgroupReader.sample` once per agent per round. Plain
file reads under `/sys/fs/cgroup/<controller>/<parent>/<container id>/` take microseconds,
while Docker's stats API blocks for one to two seconds per call. Docker 20.10 with the
cgroupfs driver creates these directories under the parent `docker`.

Disk use is the use of the agent's tmpfs mounts. The memory cgroup's `shmem` counter adds
`/tmp` and `/dev/shm` together, so it cannot tell which one is full. Instead the reader opens
each mount point through `/proc/<pid>/root` of a process in the container and calls
`fstatvfs` on it. Before that it checks that the opened directory is on the tmpfs device
that the container's own mount table lists for that path, so a symlink in the image cannot
point the reading at a host file system.

Under gVisor the tmpfs mounts live in the sandbox's kernel, so agents there get host tmpfs
volumes instead (gvisor_options.py). The reader is then given `mount_sources`, which names the
host folder of each volume; it checks in its own mount table that a tmpfs is mounted there
and measures that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.supervisor.errors import SupervisorError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_ROOT = Path("/proc")
DOCKER_CGROUP_PARENT = "docker"
NANOSECONDS = 1_000_000_000


class CgroupUnavailable(SupervisorError):
    """A container's cgroup file is missing or unreadable, and `path` names it."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"cannot read {path}: {detail}")
        self.path = path
        self.detail = detail


class DiskUnavailable(SupervisorError):
    """A container's tmpfs mount at `mount_point` (a path inside it) could not be measured."""

    def __init__(self, mount_point: str, detail: str) -> None:
        super().__init__(f"cannot measure {mount_point}: {detail}")
        self.mount_point = mount_point
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class MemoryReading:
    """Memory cgroup counters, in bytes except the counts.

    `working_set` is usage minus inactive file cache, the figure `docker stats` shows,
    because the kernel reclaims that cache before it kills. tmpfs pages count as used memory.
    """

    usage: int
    working_set: int
    max_usage: int
    limit: int | None
    failcnt: int
    oom_kills: int


@dataclass(frozen=True, kw_only=True)
class CpuReading:
    """CPU time used and CFS throttling. `limit_cpus` is None without a quota."""

    usage_seconds: float
    periods: int
    throttled_periods: int
    throttled_seconds: float
    limit_cpus: float | None


@dataclass(frozen=True, kw_only=True)
class PidsReading:
    """Tasks (processes and threads). `limit_hits` counts forks refused at the limit."""

    current: int
    limit: int | None
    peak: int | None
    limit_hits: int


@dataclass(frozen=True, kw_only=True)
class DiskReading:
    """Use of one tmpfs mount inside the container, in bytes."""

    mount_point: str
    used: int
    size: int
    available: int


@dataclass(frozen=True, kw_only=True)
class ResourceSample:
    """One reading of a container's cgroups and tmpfs mounts at `monotonic` seconds."""

    monotonic: float
    memory: MemoryReading
    cpu: CpuReading
    pids: PidsReading
    disks: tuple[DiskReading, ...] = ()
    # Mount point -> why it could not be measured. The other readings are still valid.
    disk_errors: dict[str, str] = field(default_factory=dict)


class CgroupReader:
    """Reader of cgroup v1 counters and tmpfs use of Docker containers; every call blocks."""

    def __init__(
        self,
        *,
        root: Path = CGROUP_ROOT,
        parent: str = DOCKER_CGROUP_PARENT,
        proc: Path = PROC_ROOT,
        mount_sources: Callable[[str], dict[str, str]] | None = None,
    ) -> None:
        """`mount_sources`, when given, returns a container's host folders by mount point."""
        self.root = root
        self.parent = parent
        self.proc = proc
        self.mount_sources = mount_sources
        # (container id, mount point) -> tmpfs device, read once from the mount table because
        # an agent cannot change its mounts.
        self._devices: dict[tuple[str, str], tuple[int, int]] = {}
        # (container id, mount point) -> host folder, when mount_sources is given.
        self._sources: dict[tuple[str, str], str] = {}

    def forget(self, container_id: str) -> None:
        """Drop what is cached about a container that is gone."""
        for cache in (self._devices, self._sources):
            for key in [key for key in cache if key[0] == container_id]:
                del cache[key]

    def directory(self, controller: str, container_id: str) -> str:
        """Return the cgroup directory of `container_id` under `controller`.

        Paths are plain strings because this runs for every agent in every round, and
        building pathlib objects took about a third of the CPU time of a sample.
        """
        return f"{self.root}/{controller}/{self.parent}/{container_id}"

    def sample(self, container_id: str, *, mount_points: tuple[str, ...]) -> ResourceSample:
        """Read memory, CPU, pids and the use of each tmpfs in `mount_points`.

        Raises CgroupUnavailable when a cgroup file is missing, which happens once the
        container has stopped, under cgroup v2, or when dockerd uses another cgroup parent.
        A tmpfs that cannot be measured is listed in `disk_errors` instead.
        """
        memory = self.memory(container_id)
        cpu = self.cpu(container_id)
        pids = self.pids(container_id)

        disks = []
        errors = {}
        for mount_point in mount_points:
            try:
                disks.append(self.disk(container_id, mount_point))
            except DiskUnavailable as exc:
                errors[mount_point] = exc.detail
        return ResourceSample(
            monotonic=time.monotonic(),
            memory=memory,
            cpu=cpu,
            pids=pids,
            disks=tuple(disks),
            disk_errors=errors,
        )

    def memory(self, container_id: str) -> MemoryReading:
        """Read the memory cgroup of `container_id`."""
        directory = self.directory("memory", container_id)
        usage = _read_int(f"{directory}/memory.usage_in_bytes")
        stat = _read_keyed(f"{directory}/memory.stat")
        oom = _read_keyed(f"{directory}/memory.oom_control")
        return MemoryReading(
            usage=usage,
            working_set=max(0, usage - stat.get("total_inactive_file", 0)),
            max_usage=_read_int(f"{directory}/memory.max_usage_in_bytes"),
            limit=_limit(_read_int(f"{directory}/memory.limit_in_bytes")),
            failcnt=_read_int(f"{directory}/memory.failcnt"),
            # Kernels before 4.13 have no oom_kill line; Docker's State.OOMKilled still
            # reports a kill once the container has exited.
            oom_kills=oom.get("oom_kill", 0),
        )

    def cpu(self, container_id: str) -> CpuReading:
        """Read the cpuacct and cpu cgroups of `container_id`."""
        usage = _read_int(f"{self.directory('cpuacct', container_id)}/cpuacct.usage")
        directory = self.directory("cpu", container_id)
        stat = _read_keyed(f"{directory}/cpu.stat")
        quota = _read_int(f"{directory}/cpu.cfs_quota_us")
        period = _read_int(f"{directory}/cpu.cfs_period_us")
        return CpuReading(
            usage_seconds=usage / NANOSECONDS,
            periods=stat.get("nr_periods", 0),
            throttled_periods=stat.get("nr_throttled", 0),
            throttled_seconds=stat.get("throttled_time", 0) / NANOSECONDS,
            limit_cpus=quota / period if quota > 0 and period > 0 else None,
        )

    def pids(self, container_id: str) -> PidsReading:
        """Read the pids cgroup of `container_id`."""
        directory = self.directory("pids", container_id)
        raw_limit = _read_text(f"{directory}/pids.max")
        try:
            peak: int | None = _read_int(f"{directory}/pids.peak")
        except CgroupUnavailable:
            peak = None  # pids.peak exists from Linux 6.1 on
        return PidsReading(
            current=_read_int(f"{directory}/pids.current"),
            limit=None if raw_limit == "max" else _parse_int(raw_limit, f"{directory}/pids.max"),
            peak=peak,
            limit_hits=_read_keyed(f"{directory}/pids.events").get("max", 0),
        )

    def disk(self, container_id: str, mount_point: str) -> DiskReading:
        """Measure the tmpfs mounted at `mount_point` inside the container.

        Raises DiskUnavailable when the container has no process left, no tmpfs at that path
        (as under gVisor, whose tmpfs lives inside its own kernel), or when the path leads to
        another device.
        """
        if self.mount_sources is not None:
            return self._measure_source(container_id, mount_point)
        try:
            pids = _read_text(f"{self.directory('pids', container_id)}/cgroup.procs").split()
        except CgroupUnavailable as exc:
            raise DiskUnavailable(mount_point, exc.detail) from exc
        # Any process of the container shares its mount namespace, but one may exit between
        # the listing and the open, so try a few.
        last_error = "the container has no process"
        for pid in pids[:3]:
            try:
                return self._measure(container_id, pid, mount_point)
            except FileNotFoundError as exc:
                last_error = f"process {pid} exited: {exc.strerror}"
        raise DiskUnavailable(mount_point, last_error)

    def _measure(self, container_id: str, pid: str, mount_point: str) -> DiskReading:
        device = self._devices.get((container_id, mount_point))
        if device is None:
            device = _tmpfs_device(f"{self.proc}/{pid}/mountinfo", mount_point)
            if device is None:
                raise DiskUnavailable(mount_point, f"process {pid} has no tmpfs mounted there")
            self._devices[(container_id, mount_point)] = device
        return _measure_tmpfs(mount_point, f"{self.proc}/{pid}/root{mount_point}", device)

    def _measure_source(self, container_id: str, mount_point: str) -> DiskReading:
        """Measure the host tmpfs that is mounted at `mount_point` of the container."""
        key = (container_id, mount_point)
        source = self._sources.get(key)
        if source is None:
            assert self.mount_sources is not None
            try:
                source = self.mount_sources(container_id).get(mount_point)
            except SupervisorError as exc:
                raise DiskUnavailable(mount_point, str(exc)) from exc
            if source is None:
                raise DiskUnavailable(mount_point, "the container has no volume mounted there")
            self._sources[key] = source
        device = self._devices.get(key)
        if device is None:
            try:
                device = _tmpfs_device(f"{self.proc}/self/mountinfo", source)
            except FileNotFoundError as exc:
                raise DiskUnavailable(mount_point, f"cannot read the mount table: {exc}") from exc
            if device is None:
                # Docker mounts the volume when the container starts and unmounts it when it
                # stops, so this is also what a stopped container shows.
                raise DiskUnavailable(mount_point, f"no tmpfs is mounted at {source} on the host")
            self._devices[key] = device
        try:
            return _measure_tmpfs(mount_point, source, device)
        except FileNotFoundError as exc:
            raise DiskUnavailable(mount_point, f"{source} is gone: {exc.strerror}") from exc


def _measure_tmpfs(mount_point: str, path: str, device: tuple[int, int]) -> DiskReading:
    """Measure the tmpfs at `path` after checking that it is on `device`.

    Raises FileNotFoundError when `path` is missing, and DiskUnavailable otherwise.
    """
    try:
        descriptor = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DiskUnavailable(mount_point, f"cannot open {path}: {exc.strerror}") from exc
    try:
        status = os.fstat(descriptor)
        if (os.major(status.st_dev), os.minor(status.st_dev)) != device:
            raise DiskUnavailable(
                mount_point,
                f"{path} is on device {os.major(status.st_dev)}:{os.minor(status.st_dev)}, "
                f"not on the tmpfs {device[0]}:{device[1]} that the mount table lists",
            )
        stats = os.fstatvfs(descriptor)
    finally:
        os.close(descriptor)
    return DiskReading(
        mount_point=mount_point,
        used=(stats.f_blocks - stats.f_bfree) * stats.f_frsize,
        size=stats.f_blocks * stats.f_frsize,
        available=stats.f_bavail * stats.f_frsize,
    )


def _tmpfs_device(mountinfo: str, mount_point: str) -> tuple[int, int] | None:
    """Return major and minor device numbers of the last tmpfs mounted at `mount_point`."""
    try:
        text = _read_file(mountinfo)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DiskUnavailable(mount_point, f"cannot read {mountinfo}: {exc.strerror}") from exc
    device = None
    for line in text.splitlines():
        # proc(5): "id parent major:minor root mount-point options [optional...] - type ...".
        before, _, after = line.partition(" - ")
        fields = before.split()
        if len(fields) < 5 or fields[4] != mount_point or after.split()[:1] != ["tmpfs"]:
            continue
        major, _, minor = fields[2].partition(":")
        # A later line for the same path is a mount on top of the earlier one.
        device = (int(major), int(minor))
    return device


def _limit(value: int) -> int | None:
    # cgroup v1 shows "no limit" as the largest page-aligned signed 64-bit value.
    return None if value >= 1 << 62 else value


def _read_file(path: str) -> str:
    """Read a whole kernel file with plain system calls, which cost less than open()."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(descriptor, 65536):
            chunks.append(chunk)
    finally:
        os.close(descriptor)
    return b"".join(chunks).decode()


def _read_text(path: str) -> str:
    try:
        return _read_file(path).strip()
    except OSError as exc:
        raise CgroupUnavailable(path, exc.strerror or str(exc)) from exc


def _read_int(path: str) -> int:
    return _parse_int(_read_text(path), path)


def _parse_int(text: str, path: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise CgroupUnavailable(path, f"expected an integer, got {text!r}") from exc


def _read_keyed(path: str) -> dict[str, int]:
    """Parse a flat keyed file of "name value" lines such as memory.stat or pids.events."""
    values = {}
    for line in _read_text(path).splitlines():
        name, _, value = line.partition(" ")
        try:
            values[name] = int(value)
        except ValueError as exc:
            raise CgroupUnavailable(path, f"line {line!r} is not 'name integer'") from exc
    return values
