"""Tests that every agent container is created with the full lockdown, taken from settings."""

from __future__ import annotations

from typing import Any

import pytest
from docker.models.containers import _create_container_args
from docker.types import LogConfig, Ulimit

from libs.common.settings import load_settings
from services.supervisor.container_spec import (
    LABEL_AGENT_ID,
    LABEL_HOST_ID,
    LABEL_IMAGE_DIGEST,
    LABEL_MANAGED,
    AgentContainer,
    create_arguments,
)
from services.supervisor.settings import SupervisorSettings

AGENT_ID = "ag-" + "0123456789abcdef" * 2
IMAGE_ID = "sha256:" + "1" * 64
IMAGE_DIGEST = "sha256:" + "2" * 64
SECCOMP = '{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[]}'
# Values that differ from every default, so a hard-coded value cannot pass.
SETTINGS_FLAGS = [
    "--container-memory-limit", "1GiB",
    "--container-cpu-limit", "1.5",
    "--container-pids-limit", "64",
    "--container-disk-limit", "32MiB",
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
        pytest.param(
            "tmpfs", {"/tmp": f"rw,nosuid,nodev,noexec,size={32 * 1024**2},mode=1777"}, id="tmpfs"
        ),
        pytest.param("mounts", [], id="no-mounts"),
        pytest.param("volumes", {}, id="no-volumes"),
        pytest.param("mem_limit", 1024**3, id="memory"),
        pytest.param("memswap_limit", 1024**3, id="no-swap"),
        pytest.param("mem_swappiness", 0, id="swappiness"),
        pytest.param("nano_cpus", 1_500_000_000, id="cpus"),
        pytest.param("pids_limit", 64, id="pids"),
        pytest.param("ulimits", [Ulimit(name="nofile", soft=512, hard=512)], id="nofile"),
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
    assert host_config["Mounts"] == []
    assert "Binds" not in host_config
    assert "Privileged" not in host_config
