"""Tests for reading cgroup v1 counters and tmpfs use from a fake cgroup and /proc tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.supervisor.cgroups import CgroupReader, CgroupUnavailable, DiskUnavailable

CONTAINER = "c0ffee" * 10 + "abcd"
PID = "4242"
UNLIMITED = "9223372036854771712"


def write_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


@pytest.fixture
def cgroup_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    write_files(
        root / "memory" / "docker" / CONTAINER,
        {
            "memory.usage_in_bytes": "9203712\n",
            "memory.max_usage_in_bytes": "10637312\n",
            "memory.limit_in_bytes": "67108864\n",
            "memory.failcnt": "3\n",
            "memory.stat": "cache 8400896\nshmem 8388608\ntotal_inactive_file 1000000\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        },
    )
    write_files(root / "cpuacct" / "docker" / CONTAINER, {"cpuacct.usage": "2500000000\n"})
    write_files(
        root / "cpu" / "docker" / CONTAINER,
        {
            "cpu.stat": "nr_periods 40\nnr_throttled 7\nthrottled_time 350000000\n",
            "cpu.cfs_quota_us": "50000\n",
            "cpu.cfs_period_us": "100000\n",
        },
    )
    write_files(
        root / "pids" / "docker" / CONTAINER,
        {
            "pids.current": "12\n",
            "pids.max": "64\n",
            "pids.peak": "64\n",
            "pids.events": "max 5\n",
            "cgroup.procs": f"{PID}\n",
        },
    )
    return root


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    """A fake /proc whose process PID has a /tmp on the test folder's own device."""
    proc = tmp_path / "proc"
    container_root = proc / PID / "root"
    (container_root / "tmp").mkdir(parents=True)
    (container_root / "dev" / "shm").mkdir(parents=True)
    device = os.stat(container_root / "tmp").st_dev
    write_mountinfo(
        proc,
        f"95 77 {os.major(device)}:{os.minor(device)} / /tmp rw - tmpfs tmpfs rw,size=8192k\n",
    )
    return proc


def write_mountinfo(proc: Path, text: str) -> None:
    (proc / PID / "mountinfo").write_text(
        "77 60 0:40 / / ro - overlay overlay rw\n"
        "79 77 0:44 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755\n" + text
    )


def reader(cgroup_root: Path, proc_root: Path) -> CgroupReader:
    return CgroupReader(root=cgroup_root, parent="docker", proc=proc_root)


def test_memory_reading(cgroup_root: Path, proc_root: Path) -> None:
    memory = reader(cgroup_root, proc_root).memory(CONTAINER)

    assert memory.usage == 9203712
    assert memory.working_set == 9203712 - 1000000
    assert memory.max_usage == 10637312
    assert memory.limit == 64 * 1024 * 1024
    assert memory.failcnt == 3
    assert memory.oom_kills == 2


def test_unlimited_memory_is_none(cgroup_root: Path, proc_root: Path) -> None:
    (cgroup_root / "memory" / "docker" / CONTAINER / "memory.limit_in_bytes").write_text(UNLIMITED)

    assert reader(cgroup_root, proc_root).memory(CONTAINER).limit is None


def test_cpu_reading(cgroup_root: Path, proc_root: Path) -> None:
    cpu = reader(cgroup_root, proc_root).cpu(CONTAINER)

    assert cpu.usage_seconds == 2.5
    assert cpu.periods == 40
    assert cpu.throttled_periods == 7
    assert cpu.throttled_seconds == 0.35
    assert cpu.limit_cpus == 0.5


def test_cpu_without_quota(cgroup_root: Path, proc_root: Path) -> None:
    (cgroup_root / "cpu" / "docker" / CONTAINER / "cpu.cfs_quota_us").write_text("-1\n")

    assert reader(cgroup_root, proc_root).cpu(CONTAINER).limit_cpus is None


def test_pids_reading(cgroup_root: Path, proc_root: Path) -> None:
    pids = reader(cgroup_root, proc_root).pids(CONTAINER)

    assert pids.current == 12
    assert pids.limit == 64
    assert pids.peak == 64
    assert pids.limit_hits == 5


def test_pids_without_limit_or_peak(cgroup_root: Path, proc_root: Path) -> None:
    directory = cgroup_root / "pids" / "docker" / CONTAINER
    (directory / "pids.max").write_text("max\n")
    (directory / "pids.peak").unlink()
    (directory / "pids.events").write_text("max 0\n")

    pids = reader(cgroup_root, proc_root).pids(CONTAINER)

    assert pids.limit is None
    assert pids.peak is None
    assert pids.limit_hits == 0


def test_missing_cgroup_names_path(cgroup_root: Path, proc_root: Path) -> None:
    with pytest.raises(CgroupUnavailable) as caught:
        reader(cgroup_root, proc_root).sample("0" * 64, mount_points=())

    assert caught.value.path == f"{cgroup_root}/memory/docker/{'0' * 64}/memory.usage_in_bytes"
    assert "No such file" in str(caught.value)


def test_garbled_counter_names_value(cgroup_root: Path, proc_root: Path) -> None:
    (cgroup_root / "pids" / "docker" / CONTAINER / "pids.current").write_text("many\n")

    with pytest.raises(CgroupUnavailable, match="expected an integer, got 'many'"):
        reader(cgroup_root, proc_root).pids(CONTAINER)


def test_disk_reading_uses_statvfs(cgroup_root: Path, proc_root: Path) -> None:
    disk = reader(cgroup_root, proc_root).disk(CONTAINER, "/tmp")
    expected = os.statvfs(proc_root / PID / "root" / "tmp")

    assert disk.mount_point == "/tmp"
    assert disk.size == expected.f_blocks * expected.f_frsize
    assert disk.used == (expected.f_blocks - expected.f_bfree) * expected.f_frsize
    assert 0 <= disk.available <= disk.size


def test_disk_without_tmpfs_unavailable(cgroup_root: Path, proc_root: Path) -> None:
    with pytest.raises(DiskUnavailable, match="has no tmpfs mounted there"):
        reader(cgroup_root, proc_root).disk(CONTAINER, "/dev/shm")


def test_disk_on_other_device_rejected(cgroup_root: Path, proc_root: Path) -> None:
    write_mountinfo(proc_root, "95 77 0:9999 / /tmp rw - tmpfs tmpfs rw,size=8192k\n")

    with pytest.raises(DiskUnavailable, match="not on the tmpfs 0:9999"):
        reader(cgroup_root, proc_root).disk(CONTAINER, "/tmp")


def test_disk_symlink_not_followed(cgroup_root: Path, proc_root: Path, tmp_path: Path) -> None:
    tmp = proc_root / PID / "root" / "tmp"
    tmp.rmdir()
    tmp.symlink_to(tmp_path)

    with pytest.raises(DiskUnavailable, match="cannot open"):
        reader(cgroup_root, proc_root).disk(CONTAINER, "/tmp")


def test_disk_of_exited_process(cgroup_root: Path, proc_root: Path) -> None:
    (cgroup_root / "pids" / "docker" / CONTAINER / "cgroup.procs").write_text("999999\n")

    with pytest.raises(DiskUnavailable, match="process 999999 exited"):
        reader(cgroup_root, proc_root).disk(CONTAINER, "/tmp")


def test_sample_lists_disk_errors(cgroup_root: Path, proc_root: Path) -> None:
    sample = reader(cgroup_root, proc_root).sample(CONTAINER, mount_points=("/tmp", "/dev/shm"))

    assert [disk.mount_point for disk in sample.disks] == ["/tmp"]
    assert list(sample.disk_errors) == ["/dev/shm"]
    assert sample.pids.limit_hits == 5


def volume_reader(cgroup_root: Path, proc_root: Path, sources: dict[str, str]) -> CgroupReader:
    """A reader that measures host folders, as under runsc, with `sources` by mount point."""
    return CgroupReader(
        root=cgroup_root, proc=proc_root, mount_sources=lambda container_id: sources
    )


def host_mountinfo(proc: Path, text: str) -> None:
    (proc / "self").mkdir(exist_ok=True)
    (proc / "self" / "mountinfo").write_text("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n" + text)


def test_volume_disk_measured_on_host(cgroup_root: Path, proc_root: Path, tmp_path: Path) -> None:
    volume = tmp_path / "volumes" / "v1" / "_data"
    volume.mkdir(parents=True)
    device = os.stat(volume).st_dev
    host_mountinfo(
        proc_root,
        f"300 1 {os.major(device)}:{os.minor(device)} / {volume} rw,nosuid,nodev,noexec "
        "- tmpfs tmpfs rw,size=8192k\n",
    )
    reader = volume_reader(cgroup_root, proc_root, {"/tmp": str(volume)})

    disk = reader.disk(CONTAINER, "/tmp")

    statvfs = os.statvfs(volume)
    assert disk.mount_point == "/tmp"
    assert disk.size == statvfs.f_blocks * statvfs.f_frsize


def test_unmounted_volume_unavailable(cgroup_root: Path, proc_root: Path, tmp_path: Path) -> None:
    # After the container stops Docker unmounts the volume, and the folder below must not be
    # measured in its place.
    volume = tmp_path / "volumes" / "v1" / "_data"
    volume.mkdir(parents=True)
    host_mountinfo(proc_root, "")
    reader = volume_reader(cgroup_root, proc_root, {"/tmp": str(volume)})

    with pytest.raises(DiskUnavailable, match=f"no tmpfs is mounted at {volume} on the host"):
        reader.disk(CONTAINER, "/tmp")


def test_volume_on_other_device_rejected(
    cgroup_root: Path, proc_root: Path, tmp_path: Path
) -> None:
    volume = tmp_path / "volumes" / "v1" / "_data"
    volume.mkdir(parents=True)
    host_mountinfo(proc_root, f"300 1 0:9999 / {volume} rw - tmpfs tmpfs rw,size=8192k\n")
    reader = volume_reader(cgroup_root, proc_root, {"/tmp": str(volume)})

    with pytest.raises(DiskUnavailable, match="not on the tmpfs 0:9999"):
        reader.disk(CONTAINER, "/tmp")


def test_missing_volume_named(cgroup_root: Path, proc_root: Path) -> None:
    host_mountinfo(proc_root, "")
    reader = volume_reader(cgroup_root, proc_root, {})

    with pytest.raises(DiskUnavailable, match="no volume mounted there"):
        reader.disk(CONTAINER, "/dev/shm")
