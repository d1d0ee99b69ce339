"""Tests that every agent container is created with the full lockdown, taken from settings."""

from __future__ import annotations

import json
from typing import Any

import pytest
from docker.models.containers import _create_container_args
from docker.types import LogConfig, Mount, Ulimit

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.supervisor.container_spec import (
    LABEL_AGENT_ID,
    LABEL_HOST_ID,
    LABEL_IMAGE_DIGEST,
    LABEL_MANAGED,
    AgentContainer,
    create_arguments,
)
from services.supervisor.gvisor_options import tmpfs_volume
from services.supervisor.seccomp import SHIPPED_PROFILE
from services.supervisor.settings import SupervisorSettings

AGENT_ID = "ag-" + "0123456789abcdef" * 2
IMAGE_ID = "sha256:" + "1" * 64
IMAGE_DIGEST = "sha256:" + "2" * 64
VOLUME_LABELS = {
    "io.agent-runner.managed": "true",
    "io.agent-runner.agent-id": AGENT_ID,
    "io.agent-runner.host-id": "host-1",
    "io.agent-runner.image-digest": IMAGE_DIGEST,
}
SECCOMP = '{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[]}'
# Values that differ from every default, so a hard-coded value cannot pass.
SETTINGS_FLAGS = [
    "--container-memory-limit", "1GiB",
    "--container-cpu-limit", "1.5",
    "--container-pids-limit", "64",
    "--container-disk-limit", "32MiB",
    "--container-shm-limit", "8MiB",
    "--container-nofile-limit", "512",
    "--container-log-max-size", "1MiB",
    "--bind-address", "127.0.0.2",
    "--sandbox-network", "sandbox-test",
    "--runtime", "runsc",
]  # fmt: skip


@pytest.fixture(scope="module")
def arguments() -> dict[str, Any]:
    settings = load_settings(SupervisorSettings, SETTINGS_FLAGS)
    agent = AgentContainer(
        agent_id=AGENT_ID,
        host_id="host-1",
        image_id=IMAGE_ID,
        image_digest=IMAGE_DIGEST,
        env={"MODE": "test"},
    )
    return create_arguments(agent, settings=settings, seccomp_profile=SECCOMP)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        pytest.param("image", IMAGE_ID, id="image-by-id"),
        pytest.param("name", f"agent-runner-{AGENT_ID}", id="name"),
        pytest.param("user", "65534:65534", id="user-nobody"),
        pytest.param("read_only", True, id="read-only-root"),
        pytest.param("privileged", False, id="not-privileged"),
        pytest.param("cap_drop", ["ALL"], id="cap-drop-all"),
        pytest.param(
            "security_opt", ["no-new-privileges:true", f"seccomp={SECCOMP}"], id="security-opt"
        ),
        # Under runsc /tmp is a host tmpfs volume; test_runc_tmpfs checks runc's.
        pytest.param("tmpfs", {}, id="no-docker-tmpfs-under-runsc"),
        # Under runc the list is empty (tests/unit/supervisor/test_gvisor_options.py).
        pytest.param(
            "mounts",
            [
                Mount(
                    target="/etc/resolv.conf",
                    source="/var/lib/agent-runner/resolv/sandbox-test.conf",
                    type="bind",
                    read_only=True,
                ),
                tmpfs_volume("/tmp", 32 * 1024**2, VOLUME_LABELS),
                tmpfs_volume("/dev/shm", 8 * 1024**2, VOLUME_LABELS),
            ],
            id="resolv-conf-and-volumes-under-runsc",
        ),
        pytest.param("volumes", {}, id="no-volumes"),
        pytest.param("mem_limit", 1024**3, id="memory"),
        pytest.param("memswap_limit", 1024**3, id="no-swap"),
        pytest.param("mem_swappiness", 0, id="swappiness"),
        pytest.param("nano_cpus", 1_500_000_000, id="cpus"),
        # Under runsc the cgroup bounds the sandbox and RLIMIT_NPROC the agent.
        pytest.param("pids_limit", 4096, id="sandbox-pids"),
        pytest.param(
            "ulimits",
            [
                Ulimit(name="nofile", soft=512, hard=512),
                Ulimit(name="msgqueue", soft=0, hard=0),
                Ulimit(name="nproc", soft=64, hard=64),
            ],
            id="nofile-no-message-queues-nproc",
        ),
        pytest.param("shm_size", 8 * 1024**2, id="shm-size"),
        pytest.param("ports", {"80/tcp": ("127.0.0.2", None)}, id="port-on-bind-address"),
        pytest.param("network", "sandbox-test", id="sandbox-network"),
        pytest.param("init", True, id="init"),
        pytest.param("ipc_mode", "private", id="ipc"),
        pytest.param("cgroupns", "private", id="cgroupns"),
        pytest.param("runtime", "runsc", id="runtime"),
        pytest.param("restart_policy", {"Name": "no"}, id="no-restart"),
        pytest.param("environment", {"MODE": "test"}, id="environment"),
        pytest.param(
            "sysctls",
            {"net.ipv4.ip_unprivileged_port_start": "0", "net.ipv6.conf.all.disable_ipv6": "1"},
            id="sysctls",
        ),
        pytest.param("dns", ["172.30.0.1"], id="dns-is-sandbox-gateway"),
        pytest.param(
            "log_config",
            LogConfig(
                type=LogConfig.types.JSON, config={"max-size": str(1024**2), "max-file": "2"}
            ),
            id="log-rotation",
        ),
        pytest.param(
            "labels",
            {
                LABEL_MANAGED: "true",
                LABEL_AGENT_ID: AGENT_ID,
                LABEL_HOST_ID: "host-1",
                LABEL_IMAGE_DIGEST: IMAGE_DIGEST,
            },
            id="labels",
        ),
    ],
)
def test_create_argument(arguments: dict[str, Any], option: str, expected: Any) -> None:
    assert arguments[option] == expected


@pytest.mark.parametrize(
    "option",
    [
        "cap_add",
        "devices",
        "device_requests",
        "device_cgroup_rules",
        "binds",
        "volumes_from",
        "pid_mode",
        "userns_mode",
        "uts_mode",
        "network_mode",
        "publish_all_ports",
        "extra_hosts",
    ],
)
def test_dangerous_option_absent(arguments: dict[str, Any], option: str) -> None:
    assert option not in arguments


def test_security_opt_has_no_unconfined(arguments: dict[str, Any]) -> None:
    assert [opt for opt in arguments["security_opt"] if "unconfined" in opt] == []


def test_runc_tmpfs() -> None:
    flags = [*SETTINGS_FLAGS[:-2], "--runtime", "runc", "--no-require-gvisor"]
    settings = load_settings(SupervisorSettings, flags)
    agent = AgentContainer(
        agent_id=AGENT_ID, host_id="h", image_id=IMAGE_ID, image_digest=IMAGE_DIGEST
    )

    arguments = create_arguments(agent, settings=settings, seccomp_profile=SECCOMP)

    assert arguments["tmpfs"] == {"/tmp": f"rw,nosuid,nodev,noexec,size={32 * 1024**2},mode=1777"}
    assert arguments["mounts"] == []


def test_environment_is_a_copy() -> None:
    settings = load_settings(SupervisorSettings, [])
    env = {"MODE": "test"}
    agent = AgentContainer(
        agent_id=AGENT_ID, host_id="h", image_id=IMAGE_ID, image_digest=IMAGE_DIGEST, env=env
    )

    arguments = create_arguments(agent, settings=settings, seccomp_profile=SECCOMP)
    arguments["environment"]["INJECTED"] = "1"

    assert env == {"MODE": "test"}


def test_docker_py_accepts_arguments(arguments: dict[str, Any]) -> None:
    # docker-py converts create() keywords into the API's HostConfig and rejects unknown ones;
    # this is the conversion `containers.create` runs before its request to the daemon.
    converted = _create_container_args({**arguments, "command": None, "version": "1.45"})
    host_config = converted["host_config"]

    assert host_config["ReadonlyRootfs"] is True
    assert host_config["CapDrop"] == ["ALL"]
    assert host_config["Memory"] == host_config["MemorySwap"]
    assert host_config["PortBindings"] == {"80/tcp": [{"HostIp": "127.0.0.2", "HostPort": ""}]}
    assert host_config["NetworkMode"] == "sandbox-test"
    assert [mount["Target"] for mount in host_config["Mounts"]] == [
        "/etc/resolv.conf",
        "/tmp",
        "/dev/shm",
    ]
    assert "Binds" not in host_config
    assert "Privileged" not in host_config
    assert host_config["ShmSize"] == 8 * 1024**2
    assert host_config["SecurityOpt"] == ["no-new-privileges:true", f"seccomp={SECCOMP}"]


def test_apparmor_profile_added() -> None:
    settings = load_settings(SupervisorSettings, [])
    agent = AgentContainer(
        agent_id=AGENT_ID, host_id="h", image_id=IMAGE_ID, image_digest=IMAGE_DIGEST
    )

    arguments = create_arguments(
        agent, settings=settings, seccomp_profile=SECCOMP, apparmor_profile="agent-runner-agent"
    )

    assert arguments["security_opt"] == [
        "no-new-privileges:true",
        f"seccomp={SECCOMP}",
        "apparmor=agent-runner-agent",
    ]


def test_no_apparmor_option_without_profile(arguments: dict[str, Any]) -> None:
    # Without a profile name the option is left out, never set to "unconfined".
    assert [opt for opt in arguments["security_opt"] if opt.startswith("apparmor")] == []


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param([], (64 * 1024**2, 16 * 1024**2), id="defaults"),
        pytest.param(
            ["--container-disk-limit", "1MiB", "--container-shm-limit", "1MiB"],
            (1024**2, 1024**2),
            id="minimum",
        ),
    ],
)
def test_tmpfs_sizes_from_settings(flags: list[str], expected: tuple[int, int]) -> None:
    settings = load_settings(SupervisorSettings, [*flags, "--runtime=runc", "--no-require-gvisor"])
    agent = AgentContainer(
        agent_id=AGENT_ID, host_id="h", image_id=IMAGE_ID, image_digest=IMAGE_DIGEST
    )

    arguments = create_arguments(agent, settings=settings, seccomp_profile=SECCOMP)

    assert arguments["tmpfs"]["/tmp"] == (f"rw,nosuid,nodev,noexec,size={expected[0]},mode=1777")
    assert arguments["shm_size"] == expected[1]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param(
            ["--container-disk-limit", "0"],
            "--container-disk-limit='0': Input should be greater than or equal to 1048576",
            id="disk-zero-means-unlimited",
        ),
        pytest.param(
            ["--container-shm-limit", "4096"],
            "--container-shm-limit='4096': Input should be greater than or equal to 1048576",
            id="shm-too-small",
        ),
        pytest.param(
            ["--container-memory-limit", "128MiB", "--container-shm-limit", "64MiB"],
            "plus --container-shm-limit (67108864 bytes) must be smaller than "
            "--container-memory-limit (134217728 bytes)",
            id="tmpfs-total-over-memory",
        ),
    ],
)
def test_tmpfs_limits_rejected(flags: list[str], expected: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(SupervisorSettings, flags)

    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("runtime", "clone3_action"), [("runc", "SCMP_ACT_ERRNO"), ("runsc", "SCMP_ACT_ALLOW")]
)
def test_seccomp_profile_adapted_to_runtime(runtime: str, clone3_action: str) -> None:
    flags = [f"--runtime={runtime}", "--no-require-gvisor"]
    settings = load_settings(SupervisorSettings, flags)
    agent = AgentContainer(
        agent_id=AGENT_ID, host_id="h", image_id=IMAGE_ID, image_digest=IMAGE_DIGEST
    )

    arguments = create_arguments(
        agent, settings=settings, seccomp_profile=SHIPPED_PROFILE.read_text()
    )

    seccomp = [opt for opt in arguments["security_opt"] if opt.startswith("seccomp=")]
    profile = json.loads(seccomp[0].removeprefix("seccomp="))
    actions = [rule["action"] for rule in profile["syscalls"] if rule["names"] == ["clone3"]]
    assert actions == [clone3_action]
