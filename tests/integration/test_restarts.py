"""Restarts: the gateway keeps no state, and the supervisor adopts or cleans up."""

from __future__ import annotations

import signal
import time
from typing import Any

import docker
import httpx
import pytest

from tests.integration.conftest import Tarball
from tests.support.images import build_echo_agent_image
from tests.support.stack import Stack, agent_runtime

pytestmark = pytest.mark.integration


def start_ready_agent(api: httpx.Client, tarball: Tarball) -> dict[str, str]:
    response = api.post(
        "/v1/agents",
        params={"wait": "true"},
        json={"image_url": tarball.url, "image_digest": tarball.digest},
    )
    assert response.status_code == 202, response.text
    agent: dict[str, str] = response.json()
    assert agent["state"] == "ready", agent
    return agent


def wait_for_audit_event(
    stack: Stack, event_type: str, *, agent_id: str | None = None, container_id: str
) -> dict[str, Any]:
    """Return the event of `event_type` about `container_id`; events are published async."""
    deadline = time.monotonic() + 10
    while True:
        for event in stack.audit_events(agent_id):
            if event["type"] == event_type and event["details"].get("container_id") == container_id:
                return event
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event_type} event for container {container_id} in 10 s")
        time.sleep(0.3)


def our_containers(client: docker.DockerClient, stack: Stack) -> list[str]:
    containers = client.containers.list(
        all=True, filters={"label": f"io.agent-runner.host-id={stack.host_id}"}
    )
    return [str(container.id) for container in containers]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_running_agent_survives_restart(
    api: httpx.Client,
    stack: Stack,
    echo_tarball: Tarball,
    docker_client: docker.DockerClient,
    stop_signal: signal.Signals,
) -> None:
    agent = start_ready_agent(api, echo_tarball)
    agent_id = agent["agent_id"]

    stack.stop_service("supervisor", sig=stop_signal)
    assert api.get(f"/v1/agents/{agent_id}").json()["state"] == "ready"
    assert api.get(f"/v1/agents/{agent_id}/http/").status_code == 200
    stack.start_supervisor()

    assert api.get(f"/v1/agents/{agent_id}").json()["state"] == "ready"
    assert api.get(f"/v1/agents/{agent_id}/http/").status_code == 200
    listed = [item["agent_id"] for item in api.get("/v1/agents").json()["agents"]]
    assert agent_id in listed
    logs = api.get(f"/v1/agents/{agent_id}/logs").json()["lines"]
    assert any("listening on port 80" in line["text"] for line in logs)
    stopped = api.delete(f"/v1/agents/{agent_id}").json()
    assert stopped["state"] == "stopped"
    assert agent["container_id"] not in our_containers(docker_client, stack)
    assert "adopted running agent" in stack.log_text("supervisor")
    adopted = wait_for_audit_event(
        stack, "agent.adopted", agent_id=agent_id, container_id=agent["container_id"]
    )
    assert adopted["outcome"] == "success"


def test_container_gone_during_restart_fails_agent(
    api: httpx.Client, stack: Stack, echo_tarball: Tarball, docker_client: docker.DockerClient
) -> None:
    agent = start_ready_agent(api, echo_tarball)
    container = docker_client.containers.get(agent["container_id"])
    volumes = [mount["Name"] for mount in container.attrs["Mounts"] if mount["Type"] == "volume"]
    assert len(volumes) == (2 if agent_runtime() == "runsc" else 0), volumes

    stack.stop_service("supervisor")
    # Without -v, as an operator might: the agent's volumes stay behind for the supervisor.
    container.remove(force=True)
    stack.start_supervisor()

    record = api.get(f"/v1/agents/{agent['agent_id']}").json()
    assert record["state"] == "failed"
    assert record["failure_reason"] == "container_missing"
    for volume in volumes:
        with pytest.raises(docker.errors.NotFound):
            docker_client.volumes.get(volume)


def test_unknown_labelled_container_removed_at_start(
    stack: Stack, docker_client: docker.DockerClient
) -> None:
    image_id = build_echo_agent_image(docker_client)
    try:
        stray = docker_client.containers.create(
            image_id,
            labels={
                "io.agent-runner.managed": "true",
                "io.agent-runner.host-id": stack.host_id,
                "io.agent-runner.agent-id": "ag-" + "0" * 32,
            },
        )
        stack.stop_service("supervisor")
        stack.start_supervisor()
        assert str(stray.id) not in our_containers(docker_client, stack)
        removed = wait_for_audit_event(stack, "agent.container_removed", container_id=str(stray.id))
        assert removed["reason_code"] == "no_agent_record"
    finally:
        for container in docker_client.containers.list(all=True, filters={"ancestor": image_id}):
            container.remove(force=True)
        docker_client.images.remove(image_id, force=True)


def test_exited_agent_recorded_after_restart(
    api: httpx.Client, stack: Stack, echo_tarball: Tarball, docker_client: docker.DockerClient
) -> None:
    agent = start_ready_agent(api, echo_tarball)

    stack.stop_service("supervisor")
    docker_client.containers.get(agent["container_id"]).kill()
    stack.start_supervisor()

    record = api.get(f"/v1/agents/{agent['agent_id']}").json()
    assert record["state"] == "stopped"
    assert record["stop_reason"] == "exited"
    assert record["exit_code"] == 137
    assert agent["container_id"] not in our_containers(docker_client, stack)


def test_gateway_restart_keeps_agents(
    api: httpx.Client, stack: Stack, echo_tarball: Tarball
) -> None:
    agent = start_ready_agent(api, echo_tarball)

    stack.stop_service("api")
    stack.start_api()

    assert api.get(f"/v1/agents/{agent['agent_id']}").json()["state"] == "ready"
    assert api.get(f"/v1/agents/{agent['agent_id']}/http/").status_code == 200
    assert api.delete(f"/v1/agents/{agent['agent_id']}").json()["state"] == "stopped"
