"""Container options that agents get under gVisor, and only there: resolv.conf, volumes, nproc."""

from __future__ import annotations

import stat
from pathlib import Path

from docker.types import Mount, Ulimit

from libs.common.settings import load_settings
from services.supervisor.gvisor_options import (
    agent_mounts,
    agent_tmpfs,
    nproc_ulimits,
    resolv_conf_path,
    write_resolv_conf,
)
from services.supervisor.settings import SupervisorSettings


def settings_for(runtime: str, cache_dir: Path) -> SupervisorSettings:
    return load_settings(
        SupervisorSettings,
        [
            f"--runtime={runtime}",
            "--no-require-gvisor",
            f"--cache-dir={cache_dir}",
            "--sandbox-network=net-a",
            "--sandbox-subnet=172.28.5.0/24",
            "--container-pids-limit=50",
        ],
    )


def test_no_mounts_under_runc(tmp_path: Path) -> None:
    assert agent_mounts(settings_for("runc", tmp_path / "cache")) == []


def test_resolv_conf_mount_under_runsc(tmp_path: Path) -> None:
    settings = settings_for("runsc", tmp_path / "cache")

    mounts = agent_mounts(settings)

    assert mounts[0] == Mount(
        target="/etc/resolv.conf",
        source=str(tmp_path / "resolv" / "net-a.conf"),
        type="bind",
        read_only=True,
    )


def test_writable_volumes_under_runsc(tmp_path: Path) -> None:
    settings = settings_for("runsc", tmp_path / "cache")

    volumes = agent_mounts(settings, {"io.agent-runner.agent-id": "ag-1"})[1:]

    assert [volume["Target"] for volume in volumes] == ["/tmp", "/dev/shm"]
    for volume, size in zip(volumes, (64 * 1024**2, 16 * 1024**2), strict=True):
        assert volume["Type"] == "volume"
        assert volume["Source"] is None  # anonymous, so `docker rm -v` removes it
        assert volume["VolumeOptions"]["NoCopy"] is True
        assert volume["VolumeOptions"]["Labels"] == {"io.agent-runner.agent-id": "ag-1"}
        assert volume["VolumeOptions"]["DriverConfig"] == {
            "Name": "local",
            "Options": {
                "type": "tmpfs",
                "device": "tmpfs",
                "o": f"size={size},nosuid,nodev,noexec,mode=1777",
            },
        }
    assert agent_tmpfs(settings, "rw,size=1") == {}


def test_runc_tmp_is_docker_tmpfs(tmp_path: Path) -> None:
    settings = settings_for("runc", tmp_path / "cache")

    assert agent_tmpfs(settings, "rw,size=1") == {"/tmp": "rw,size=1"}


def test_resolv_conf_names_gateway(tmp_path: Path) -> None:
    settings = settings_for("runsc", tmp_path / "cache")

    path = write_resolv_conf(settings)

    assert path == resolv_conf_path(settings)
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert lines == ["nameserver 172.28.5.1", "options ndots:0"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [entry.name for entry in path.parent.iterdir()] == ["net-a.conf"]


def test_runc_limits_processes_by_cgroup(tmp_path: Path) -> None:
    settings = settings_for("runc", tmp_path / "cache")

    assert settings.host_pids_limit == 50
    assert nproc_ulimits(settings) == []


def test_runsc_limits_processes_by_nproc(tmp_path: Path) -> None:
    settings = settings_for("runsc", tmp_path / "cache")

    assert settings.host_pids_limit == 4096
    assert nproc_ulimits(settings) == [Ulimit(name="nproc", soft=50, hard=50)]
