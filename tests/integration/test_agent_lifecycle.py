"""An agent started from a real tarball through the gateway, inspected in Docker, stopped."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import docker
import httpx
import pytest

from libs.common.messages import AgentNetworkPolicy
from libs.common.registry import AgentRegistry
from libs.common.settings import CommonSettings, load_settings
from libs.common.store import connect_redis
from tests.integration.conftest import Tarball
from tests.support.stack import Stack, agent_runtime, wait_for_state

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def start_agent(api: httpx.Client, tarball: Tarball, **extra: Any) -> dict[str, Any]:
    response = api.post(
        "/v1/agents",
        params={"wait": "true"},
        json={"image_url": tarball.url, "image_digest": tarball.digest, **extra},
    )
    assert response.status_code == 202, response.text
    agent: dict[str, Any] = response.json()
    return agent


def test_agent_runs_locked_down_and_stops(
    api: httpx.Client, stack: Stack, echo_tarball: Tarball, docker_client: docker.DockerClient
) -> None:
    agent = start_agent(api, echo_tarball, env={"GREETING": "hello"})
    assert agent["state"] == "ready", agent
    agent_id = agent["agent_id"]

    reply = api.post(
        f"/v1/agents/{agent_id}/http/cgi-bin/echo", params={"x": "1"}, content=b"ping body"
    )
    assert reply.status_code == 200
    assert "method: POST" in reply.text
    assert "query: x=1" in reply.text
    assert "ping body" in reply.text
    assert reply.headers["x-request-id"]

    container = docker_client.containers.get(agent["container_id"])
    host_config = container.attrs["HostConfig"]
    assert container.attrs["Config"]["User"] == "65534:65534"
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["CapDrop"] == ["ALL"]
    assert host_config["CapAdd"] is None
    assert host_config["Privileged"] is False
    assert "no-new-privileges:true" in host_config["SecurityOpt"]
    seccomp = [opt for opt in host_config["SecurityOpt"] if opt.startswith("seccomp=")]
    assert len(seccomp) == 1
    assert json.loads(seccomp[0].removeprefix("seccomp="))["defaultAction"] == "SCMP_ACT_ERRNO"
    if agent_runtime() == "runc":
        assert host_config["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,noexec,size=67108864,mode=1777"}
    else:
        assert "Tmpfs" not in host_config or not host_config["Tmpfs"]
    assert host_config["Memory"] == 512 * MIB
    assert host_config["MemorySwap"] == 512 * MIB
    assert host_config["NanoCpus"] == 1_000_000_000
    if agent_runtime() == "runc":
        assert host_config["PidsLimit"] == 100
    else:
        # gVisor's threads count in the cgroup; the agent's limit is RLIMIT_NPROC inside.
        assert host_config["PidsLimit"] == 4096
        assert {"Name": "nproc", "Soft": 100, "Hard": 100} in host_config["Ulimits"]
    assert host_config["PortBindings"] == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert host_config["Binds"] is None
    if agent_runtime() == "runc":
        assert container.attrs["Mounts"] == []
    else:
        # Under runsc: the resolv.conf naming the sandbox gateway, and /tmp and /dev/shm as
        # host tmpfs volumes labelled with the agent.
        mounts = container.attrs["Mounts"]
        assert sorted((mount["Destination"], mount["Type"], mount["RW"]) for mount in mounts) == [
            ("/dev/shm", "volume", True),
            ("/etc/resolv.conf", "bind", False),
            ("/tmp", "volume", True),
        ]
        for mount in mounts:
            if mount["Type"] == "volume":
                volume = docker_client.volumes.get(mount["Name"])
                assert volume.attrs["Labels"]["io.agent-runner.agent-id"] == agent_id
                assert volume.attrs["Options"]["type"] == "tmpfs"
    assert container.attrs["NetworkSettings"]["Networks"].keys() == {stack.network}
    published = container.attrs["NetworkSettings"]["Ports"]["80/tcp"]
    assert [binding["HostIp"] for binding in published] == ["127.0.0.1"]
    assert container.labels["io.agent-runner.agent-id"] == agent_id

    status = container.exec_run(["cat", "/proc/1/status"]).output.decode()
    if agent_runtime() == "runc":
        # gVisor's /proc/PID/status has no NoNewPrivs line (runsc 0.0~20221219).
        assert "NoNewPrivs:\t1" in status
    assert "Seccomp:\t2" in status
    assert "CapEff:\t0000000000000000" in status
    assert container.exec_run(["touch", "/probe"]).exit_code != 0
    assert container.exec_run(["touch", "/tmp/probe"]).exit_code == 0
    assert container.exec_run(["id", "-u"]).output.decode().strip() == "65534"
    greeting = container.exec_run(["sh", "-c", "echo $GREETING"]).output.decode().strip()
    assert greeting == "hello"

    logs = api.get(f"/v1/agents/{agent_id}/logs").json()["lines"]
    assert any("echo-agent: listening on port 80" in line["text"] for line in logs)

    stopped = api.delete(f"/v1/agents/{agent_id}")
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped"
    assert stopped.json()["stop_reason"] == "requested"
    assert stopped.json()["exit_code"] is not None
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(agent["container_id"])
    assert api.get(f"/v1/agents/{agent_id}").json()["state"] == "stopped"
    kept_logs = api.get(f"/v1/agents/{agent_id}/logs").json()["lines"]
    assert any("listening on port 80" in line["text"] for line in kept_logs)

    types = [event["type"] for event in stack.audit_events(agent_id)]
    for expected in (
        "agent.requested",
        "image.verified",
        "agent.created",
        "agent.started",
        "agent.ready",
        "agent.stop_requested",
        "agent.stopped",
    ):
        assert expected in types, types


def registered_policy(host_id: str, address: str) -> AgentNetworkPolicy | None:
    """Return the policy that netguard stored in Redis for `address` on `host_id`."""

    async def read() -> AgentNetworkPolicy | None:
        client = connect_redis(load_settings(CommonSettings, []))
        try:
            return await AgentRegistry(client, host_id=host_id).get(address)
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_allowed_domains_reach_network_policy(
    api: httpx.Client, stack: Stack, echo_tarball: Tarball, docker_client: docker.DockerClient
) -> None:
    domains = ["example.test", "*.api.example.test"]

    agent = start_agent(api, echo_tarball, allowed_domains=domains)

    assert agent["state"] == "ready", agent
    assert agent["allowed_domains"] == domains
    agent_id = agent["agent_id"]
    assert api.get(f"/v1/agents/{agent_id}").json()["allowed_domains"] == domains
    container = docker_client.containers.get(agent["container_id"])
    address = container.attrs["NetworkSettings"]["Networks"][stack.network]["IPAddress"]
    policy = registered_policy(stack.host_id, address)
    assert policy == AgentNetworkPolicy(agent_id=agent_id, address=address, allowed_domains=domains)

    stopped = api.delete(f"/v1/agents/{agent_id}")
    assert stopped.json()["allowed_domains"] == domains
    assert registered_policy(stack.host_id, address) is None
    events = {event["type"]: event for event in stack.audit_events(agent_id)}
    assert events["agent.requested"]["details"]["allowed_domains"] == domains
    assert events["firewall.policy_added"]["details"]["allowed_domains"] == domains
    assert events["firewall.policy_removed"]["details"]["allowed_domains"] == domains


def test_second_start_uses_cached_tarball(
    api: httpx.Client, stack: Stack, echo_tarball: Tarball
) -> None:
    first = start_agent(api, echo_tarball)
    echo_tarball.path.rename(echo_tarball.path.with_suffix(".moved"))
    try:
        second = start_agent(api, echo_tarball)
    finally:
        echo_tarball.path.with_suffix(".moved").rename(echo_tarball.path)
    assert second["state"] == "ready", second
    assert second["image_id"] == first["image_id"]
    for agent in (first, second):
        api.delete(f"/v1/agents/{agent['agent_id']}")
    cached = stack.workdir / "cache" / "sha256" / f"{echo_tarball.digest[7:]}.tar"
    assert cached.exists()


def test_listing_shows_agent(api: httpx.Client, echo_tarball: Tarball) -> None:
    agent = start_agent(api, echo_tarball)
    listed = api.get("/v1/agents").json()["agents"]
    assert agent["agent_id"] in [item["agent_id"] for item in listed]
    api.delete(f"/v1/agents/{agent['agent_id']}")


def test_agent_outliving_lifetime_is_killed(
    api: httpx.Client, stack: Stack, echo_tarball: Tarball, docker_client: docker.DockerClient
) -> None:
    agent = start_agent(api, echo_tarball, lifetime_seconds=2)
    assert agent["state"] == "ready"
    stopped = wait_for_state(api, agent["agent_id"], {"stopped", "failed"}, timeout=30)
    assert stopped["stop_reason"] == "lifetime_exceeded"
    assert stopped["killed_for_time"] is True
    assert stopped["exit_code"] is not None
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(agent["container_id"])
    types = [event["type"] for event in stack.audit_events(agent["agent_id"])]
    assert "agent.killed" in types
