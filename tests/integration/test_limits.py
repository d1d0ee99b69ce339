"""Ten misbehaving agents at once, each stopped by its own limit with a typed stop reason.

The stress agents (tests/support/stress.py) become ready like any agent; the test then sends
each one a request through the gateway that starts its stress, all at about the same moment.
Meanwhile a well-behaved echo agent must keep answering and every request to the gateway
must succeed. The gateway's latency under this load against its idle latency is a speed
figure: bench/stress.py measures it with the same request loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import docker
import httpx
import pytest

from tests.integration.conftest import Tarball, make_tarball, trusted_sources
from tests.support.images import build_echo_agent_image
from tests.support.stack import FileServer, Stack, agent_runtime, running_stack, wait_for_state
from tests.support.stress import (
    CPU_LIFETIME,
    EXPECTED,
    LATENCY_SAMPLES,
    POLL_EVERY,
    STRESS_DEADLINE,
    SUPERVISOR_LIMIT_ARGS,
    build_stress_image,
    echo_answers,
    p99,
    probe,
    start,
)

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def served_image(
    client: docker.DockerClient, server: FileServer, image_id: str, name: str
) -> Iterator[Tarball]:
    """Serve `image_id` as a tarball; remove the tarball and the image that stacks loaded."""
    tarball = make_tarball(client, server, image_id, name)
    try:
        yield tarball
    finally:
        tarball.path.unlink(missing_ok=True)
        with contextlib.suppress(docker.errors.NotFound):
            client.images.remove(image_id, force=True)


@pytest.fixture(scope="module")
def limits_echo_tarball(
    docker_client: docker.DockerClient, served: FileServer
) -> Iterator[Tarball]:
    # An echo image of this module's own: the agent store maps a digest to its loaded image
    # in the shared Redis, so reusing the session's echo tarball here would let other tests'
    # stacks skip the download and the image cache that they check.
    image_id = build_echo_agent_image(docker_client)
    with served_image(docker_client, served, image_id, "limits-echo.tar") as tarball:
        yield tarball


@pytest.fixture(scope="module")
def stress_tarball(docker_client: docker.DockerClient, served: FileServer) -> Iterator[Tarball]:
    image_id = build_stress_image(docker_client)
    with served_image(docker_client, served, image_id, "stress.tar") as tarball:
        yield tarball


@pytest.fixture(scope="module")
def limits_stack(tmp_path_factory: pytest.TempPathFactory, served: FileServer) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("limits"),
        network="agent-runner-limits",
        subnet="172.29.31.0/24",
        bridge="ar-limits0",
        supervisor_args=[*SUPERVISOR_LIMIT_ARGS, *trusted_sources(served.url(""))],
        api_args=["--rate-limit=1000", "--rate-limit-burst=1000"],
    ) as running:
        yield running


def test_each_stress_stopped_by_own_limit(
    limits_stack: Stack,
    limits_echo_tarball: Tarball,
    stress_tarball: Tarball,
    docker_client: docker.DockerClient,
) -> None:
    with httpx.Client(
        base_url=limits_stack.api_url, headers=limits_stack.headers, timeout=60
    ) as api:
        echo = start(api, limits_echo_tarball, lifetime=600, wait=True)
        assert echo["state"] == "ready", echo

        kinds = [kind for kind in EXPECTED for _ in range(2)]
        agents = {}
        for kind in kinds:
            lifetime = CPU_LIFETIME if kind == "cpu" else 300
            agent = start(api, stress_tarball, lifetime=lifetime, wait=False)
            agents[agent["agent_id"]] = kind
        volumes = []
        for agent_id in agents:
            ready = wait_for_state(api, agent_id, {"ready", "stopped", "failed"}, timeout=60)
            assert ready["state"] == "ready", ready
            volumes += agent_volumes(docker_client, ready["container_id"])
        # Under runsc /tmp and /dev/shm are host tmpfs volumes, which must go with the agent.
        assert len(volumes) == (2 * len(agents) if agent_runtime() == "runsc" else 0), volumes
        watched = list(agents)
        probe(api, echo["agent_id"], watched, samples=POLL_EVERY, seconds=60)
        before = probe(api, echo["agent_id"], watched, samples=LATENCY_SAMPLES, seconds=60)
        assert before.final == {}, before.final

        for agent_id, kind in agents.items():
            reply = api.get(f"/v1/agents/{agent_id}/http/cgi-bin/go?{kind}")
            assert reply.status_code == 200, reply.text
        stress = probe(api, echo["agent_id"], watched, samples=None, seconds=STRESS_DEADLINE)

        after = probe(api, echo["agent_id"], watched, samples=LATENCY_SAMPLES, seconds=60)
        echo_alive = echo_answers(api, echo["agent_id"])
        api.delete(f"/v1/agents/{echo['agent_id']}")

    finished = stress.final
    idle = before.latencies + after.latencies
    loaded = stress.latencies
    echo_checks = stress.echo_checks

    assert len(finished) == len(agents), f"still running: {set(agents) - set(finished)}"
    for agent_id, agent in finished.items():
        kind = agents[agent_id]
        reason, _ = EXPECTED[kind]
        assert agent["state"] == "stopped", (kind, agent)
        assert agent["stop_reason"] == reason, (kind, agent)
        usage = agent["resource_usage"]
        assert usage is not None, agent
        assert usage["memory_peak_bytes"] > 0
        assert usage["cpu_seconds"] >= 0
        assert usage["pids_peak"] >= 1
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(agent["container_id"])

    for agent_id, kind in agents.items():
        reason, stop_event = EXPECTED[kind]
        events = limits_stack.audit_events(agent_id)
        stops = [event for event in events if event["type"] == stop_event]
        assert [event["reason_code"] for event in stops] == [reason], (kind, events)
        assert stops[0]["details"]["resource_usage"] is not None
        warnings = [event for event in events if event["type"] == "agent.limit_warning"]
        types = [event["type"] for event in events]
        if kind == "cpu":
            assert "cpu" in [event["details"]["resource"] for event in warnings], (kind, events)
            assert "agent.lifetime_warning" in types, (kind, types)
        else:
            assert "agent.limit_reached" in types, (kind, types)
        if kind in {"tmp", "shm"}:
            mount = "/tmp" if kind == "tmp" else "/dev/shm"
            disk = [event for event in warnings if event["details"]["resource"] == "disk"]
            assert [event["details"]["mount_point"] for event in disk] == [mount], events

    assert echo_checks, "the loop ended before the echo agent was checked"
    assert all(echo_checks), echo_checks
    assert echo_alive
    # timed_get checked that every record GET returned 200. How much slower they were under
    # stress is a speed figure, which bench/stress.py compares with the idle latency of the
    # same run. The test only prints it for the log.
    print(
        f"record GET p99: idle {p99(idle) * 1000:.2f} ms over {len(idle)} requests, "
        f"under stress {p99(loaded) * 1000:.2f} ms over {len(loaded)} requests"
    )


def agent_volumes(client: docker.DockerClient, container_id: str) -> list[str]:
    """Return the names of the container's volumes."""
    mounts = client.containers.get(container_id).attrs["Mounts"]
    return [mount["Name"] for mount in mounts if mount["Type"] == "volume"]


def test_operator_stop_records_usage(limits_stack: Stack, stress_tarball: Tarball) -> None:
    with httpx.Client(
        base_url=limits_stack.api_url, headers=limits_stack.headers, timeout=60
    ) as api:
        agent = start(api, stress_tarball, lifetime=300, wait=True)
        assert agent["state"] == "ready", agent
        assert agent["resource_usage"] is None

        stopped = api.delete(f"/v1/agents/{agent['agent_id']}").json()

    assert stopped["stop_reason"] == "requested"
    assert stopped["resource_usage"]["memory_peak_bytes"] > 0
    events = limits_stack.audit_events(agent["agent_id"])
    assert [event["reason_code"] for event in events if event["type"] == "agent.stopped"] == [
        "requested"
    ]
