"""Container options that differ under gVisor: DNS, writable storage and the process limit.

On a user-defined network Docker writes `nameserver 127.0.0.11` into every container and
serves DNS there from a socket in the container's network namespace. Under runsc, gVisor's own
network stack handles 127.0.0.11, so the query is refused (checked with Docker 20.10 and
runsc 0.0~20221219). Agents under runsc therefore get a read-only bind mount of a resolv.conf
that names the sandbox gateway, the address to which Docker's resolver forwards under runc;
netguard redirects DNS to the gateway to the proxy's DNS filter under both runtimes.

gVisor serves a container's tmpfs mounts from its own kernel's memory, where the host cannot
measure them, so a full /tmp would only return ENOSPC and never be reported. Under runsc /tmp
and /dev/shm are therefore anonymous Docker volumes of the local driver with type tmpfs:
the host mounts a size-limited tmpfs with nosuid,nodev,noexec and mode 1777, gVisor's gofer
serves it to the sandbox, and the supervisor measures it with statvfs on the host
(cgroups.py). Docker removes anonymous volumes with the container (`docker rm -v`), and it
unmounts them when the container stops, so nothing is written to disk. Docker cannot put
nosuid, nodev or noexec on a volume inside the container; the gVisor wrapper runtime adds them
to every writable bind mount, and gVisor enforces them (runtime/runsc_agent_runner.py).

The pids cgroup of a gVisor container counts the sandbox's own host threads, so under runsc
the agent's process limit is RLIMIT_NPROC, which gVisor enforces inside its kernel.
"""

from __future__ import annotations

import logging
import os
from ipaddress import IPv4Address
from pathlib import Path

from docker.types import DriverConfig, Mount, Ulimit

from services.supervisor.settings import SupervisorSettings

logger = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
TMP = "/tmp"  # noqa: S108 - a path inside the agent
SHM = "/dev/shm"  # noqa: S108 - a path inside the agent


def resolv_conf_path(settings: SupervisorSettings) -> Path:
    """Return the host path of the agents' resolv.conf: beside --cache-dir, one per network."""
    return settings.cache_dir.parent / "resolv" / f"{settings.sandbox_network}.conf"


def resolv_conf_text(settings: SupervisorSettings) -> str:
    """Return a resolv.conf that sends every query to the sandbox gateway."""
    gateway: IPv4Address = next(settings.sandbox_subnet.hosts())
    # ndots:0 as in Docker's own file: agents' names are never completed with a search domain.
    return (
        "# Written by the agent-runner supervisor for agents under gVisor.\n"
        f"nameserver {gateway}\noptions ndots:0\n"
    )


def write_resolv_conf(settings: SupervisorSettings) -> Path:
    """Write the agents' resolv.conf (mode 644) atomically and return its path.

    Raises OSError when the folder cannot be created or the file cannot be written.
    """
    path = resolv_conf_path(settings)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(resolv_conf_text(settings))
    temporary.chmod(0o644)
    temporary.replace(path)
    logger.info("wrote %s for agents under gVisor", path)
    return path


def agent_mounts(settings: SupervisorSettings, labels: dict[str, str] | None = None) -> list[Mount]:
    """Return the mounts an agent's runtime needs: none under runc.

    Under runsc: a read-only resolv.conf, and /tmp and /dev/shm as host tmpfs volumes that
    carry `labels`, so that volumes left by a container removed without them can be found.
    """
    if settings.runtime != "runsc":
        return []
    return [
        Mount(
            target=RESOLV_CONF, source=str(resolv_conf_path(settings)), type="bind", read_only=True
        ),
        tmpfs_volume(TMP, int(settings.container_disk_limit), labels),
        tmpfs_volume(SHM, int(settings.container_shm_limit), labels),
    ]


def tmpfs_volume(target: str, size: int, labels: dict[str, str] | None = None) -> Mount:
    """Return an anonymous volume at `target`: a host tmpfs of `size` bytes that runs nothing.

    no_copy keeps what the image has at `target` out of the volume, as a tmpfs mount would.
    """
    options = {
        "type": "tmpfs",
        "device": "tmpfs",
        "o": f"size={size},nosuid,nodev,noexec,mode=1777",
    }
    return Mount(
        target=target,
        source=None,
        type="volume",
        no_copy=True,
        labels=dict(labels or {}),
        driver_config=DriverConfig("local", options),
    )


def agent_tmpfs(settings: SupervisorSettings, options: str) -> dict[str, str]:
    """Return the tmpfs mounts Docker makes: /tmp with `options` under runc, none under runsc."""
    if settings.runtime == "runsc":
        return {}
    return {TMP: options}


def nproc_ulimits(settings: SupervisorSettings) -> list[Ulimit]:
    """Return RLIMIT_NPROC = --container-pids-limit under runsc, where gVisor counts per sandbox.

    Under runc the kernel counts RLIMIT_NPROC per user id across every agent, so the pids
    cgroup limits each agent there instead (settings.host_pids_limit).
    """
    if settings.runtime != "runsc":
        return []
    limit = settings.container_pids_limit
    return [Ulimit(name="nproc", soft=limit, hard=limit)]
