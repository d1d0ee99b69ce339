"""The hardened container definition every agent runs in.

Kept apart from the Docker calls so that every option is visible in one place and unit tests
can check the whole lockdown without a daemon. What each option defends against:

- user 65534:65534, `cap_drop=ALL`, `no-new-privileges`: no root, no capabilities, and no way
  back to either through setuid or setgid binaries in the image, because the kernel ignores
  those bits under no-new-privileges.
- read-only root, a size-limited `/tmp` tmpfs and a size-limited `/dev/shm` (both
  `nosuid,nodev,noexec`, mode 1777 so the unprivileged user can write): the only writable
  storage is memory-backed and bounded. POSIX message queues in /dev/mqueue get a zero
  RLIMIT_MSGQUEUE, because that limit is per user and every agent runs as the same user.
- seccomp profile passed explicitly (seccomp.py): a daemon configured without one still
  confines agents. The AppArmor profile (apparmor.py) is added when the kernel enforces
  AppArmor.
- under gVisor, /tmp and /dev/shm are host tmpfs volumes with the same options, which the
  supervisor can measure (gvisor_options.py).
- memory (swap included), CPU, pids and open-file limits; `oom_score_adj` makes the host's
  OOM killer pick an agent before a service.
- port 80 published only on the bind address, on an ephemeral port.
- no other mounts, no privileged mode, private IPC and cgroup namespaces, log rotation by Docker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from docker.types import LogConfig, Ulimit

from services.supervisor.gvisor_options import agent_mounts, agent_tmpfs, nproc_ulimits
from services.supervisor.seccomp import profile_for_runtime
from services.supervisor.settings import SupervisorSettings

AGENT_USER = "65534:65534"
AGENT_PORT = "80/tcp"

LABEL_MANAGED = "io.agent-runner.managed"
LABEL_AGENT_ID = "io.agent-runner.agent-id"
LABEL_HOST_ID = "io.agent-runner.host-id"
LABEL_IMAGE_DIGEST = "io.agent-runner.image-digest"


@dataclass(frozen=True, kw_only=True)
class AgentContainer:
    """What varies between agents; everything else comes from settings."""

    agent_id: str
    host_id: str
    image_id: str
    image_digest: str
    env: dict[str, str] = field(default_factory=dict)


def container_name(agent_id: str) -> str:
    """Return the Docker container name of an agent."""
    return f"agent-runner-{agent_id}"


def sandbox_gateway(settings: SupervisorSettings) -> IPv4Address:
    """Return the host's address on the sandbox bridge, the first of the subnet."""
    return next(settings.sandbox_subnet.hosts())


def tmpfs_options(settings: SupervisorSettings) -> str:
    """Return the mount options of the agent's writable /tmp."""
    return f"rw,nosuid,nodev,noexec,size={int(settings.container_disk_limit)},mode=1777"


def security_options(seccomp_profile: str, apparmor_profile: str | None) -> list[str]:
    """Return Docker's security options: no-new-privileges, seccomp and maybe AppArmor.

    seccomp_profile is the profile's JSON text. apparmor_profile None leaves AppArmor out,
    which is only right on a kernel without AppArmor, because Docker would then apply its
    own docker-default profile instead.
    """
    options = ["no-new-privileges:true", f"seccomp={seccomp_profile}"]
    if apparmor_profile is not None:
        options.append(f"apparmor={apparmor_profile}")
    return options


def create_arguments(
    agent: AgentContainer,
    *,
    settings: SupervisorSettings,
    seccomp_profile: str,
    apparmor_profile: str | None = None,
) -> dict[str, Any]:
    """Return keyword arguments for `docker.client.containers.create` for this agent.

    seccomp_profile is the JSON text of the profile, which profile_for_runtime adapts to
    --runtime. apparmor_profile is the name of a loaded AppArmor profile, or None when the
    kernel has no AppArmor.
    """
    memory = int(settings.container_memory_limit)
    labels = {
        LABEL_MANAGED: "true",
        LABEL_AGENT_ID: agent.agent_id,
        LABEL_HOST_ID: agent.host_id,
        LABEL_IMAGE_DIGEST: agent.image_digest,
    }
    return {
        "image": agent.image_id,
        "name": container_name(agent.agent_id),
        "hostname": "agent",
        "user": AGENT_USER,
        "environment": dict(agent.env),
        "labels": labels,
        "detach": True,
        "read_only": True,
        "privileged": False,
        "cap_drop": ["ALL"],
        "security_opt": security_options(
            profile_for_runtime(seccomp_profile, settings.runtime), apparmor_profile
        ),
        "tmpfs": agent_tmpfs(settings, tmpfs_options(settings)),
        # Docker mounts /dev/shm as tmpfs with nosuid,nodev,noexec and mode 1777 (checked with
        # Docker 20.10 by tests/integration/test_filesystem_limits.py); this sets its size.
        "shm_size": int(settings.container_shm_limit),
        # Under runsc only: a read-only resolv.conf naming the sandbox gateway, and /tmp and
        # /dev/shm as host tmpfs volumes (gvisor_options.py).
        "mounts": agent_mounts(settings, labels),
        "volumes": {},
        "mem_limit": memory,
        "memswap_limit": memory,
        "mem_swappiness": 0,
        "oom_score_adj": 500,
        "nano_cpus": int(settings.container_cpu_limit * 1_000_000_000),
        # Under runsc the cgroup limit bounds gVisor's own threads, and gVisor enforces the
        # agent's process limit as RLIMIT_NPROC, which under runc would count every agent's
        # processes together because they share one user id.
        "pids_limit": settings.host_pids_limit,
        "ulimits": [
            Ulimit(
                name="nofile",
                soft=settings.container_nofile_limit,
                hard=settings.container_nofile_limit,
            ),
            Ulimit(name="msgqueue", soft=0, hard=0),
            *nproc_ulimits(settings),
        ],
        # The agent's unprivileged user must bind port 80 without CAP_NET_BIND_SERVICE; this
        # sysctl is per network namespace and changes nothing on the host.
        # IPv6 is off inside the agent, so no address family escapes the IPv4 firewall rules.
        "sysctls": {
            "net.ipv4.ip_unprivileged_port_start": "0",
            "net.ipv6.conf.all.disable_ipv6": "1",
        },
        # Docker's embedded resolver forwards to this address from inside the agent's network
        # namespace, where netguard redirects port 53 to the proxy's DNS filter.
        "dns": [str(sandbox_gateway(settings))],
        "ports": {AGENT_PORT: (str(settings.bind_address), None)},
        "network": settings.sandbox_network,
        # Docker's tini as PID 1 forwards SIGTERM and reaps zombies, which an agent's own
        # PID 1 may not do.
        "init": True,
        "ipc_mode": "private",
        "cgroupns": "private",
        "runtime": settings.docker_runtime,
        "restart_policy": {"Name": "no"},
        "log_config": LogConfig(
            type=LogConfig.types.JSON,
            config={"max-size": str(int(settings.container_log_max_size)), "max-file": "2"},
        ),
    }
