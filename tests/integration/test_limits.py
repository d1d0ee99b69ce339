"""Ten misbehaving agents at once, each stopped by its own limit with a typed stop reason.

The stress agents run busybox httpd, so they become ready like any agent. The test then
sends each one a request through the gateway that starts its stress (`/cgi-bin/go?<kind>`),
all at about the same moment. Meanwhile a well-behaved echo agent must keep answering, and
the gateway's p99 latency for reading an agent's record must stay within twice its idle
value.

Idle and loaded latency come from the same request loop: a GET of the echo agent's record
every 10 ms and, every 25th time, a request to the echo agent and a GET of each stress
agent's record. A tight loop of GETs alone is faster than that mix, so it would not be a fair
idle value. The idle latency is measured both while the stress agents are ready but quiet
and after all of them have stopped, and the two are pooled, because other work on a shared
test machine shifts latency over tens of seconds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import docker
import httpx
import pytest

from tests.integration.conftest import Tarball, make_tarball, trusted_sources
from tests.support.images import build_busybox_image, build_echo_agent_image
from tests.support.stack import FileServer, Stack, running_stack, wait_for_state

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CPU_LIFETIME = 20
# Each kind runs twice. Values are the stop reason and the audit event it must end with.
EXPECTED = {
    "fork": ("pids_limit_reached", "agent.stopped"),
    "memory": ("out_of_memory", "agent.stopped"),
    "tmp": ("disk_limit_reached", "agent.stopped"),
    "shm": ("disk_limit_reached", "agent.stopped"),
    "cpu": ("lifetime_exceeded", "agent.killed"),
}
LATENCY_SAMPLES = 300
POLL_EVERY = 25
PAUSE = 0.01
STRESS_DEADLINE = 90.0
FINAL_STATES = {"stopped", "failed"}

STRESS_SCRIPT = b"""#!/bin/sh
# Run one stress until a limit stops it; the kind is the first argument.
case "$1" in
fork) bomb() { bomb | bomb & }; bomb ;;
memory) ( x=aaaaaaaaaaaaaaaa; while :; do x="$x$x"; done ) ;;
tmp) dd if=/dev/zero of=/tmp/fill bs=65536 ;;
shm) dd if=/dev/zero of=/dev/shm/fill bs=65536 ;;
cpu) while :; do :; done ;;
esac
exec sleep 3600
"""

# A CGI script, so that the stress starts only once the agent is ready and the test requests it.
GO_SCRIPT = b"""#!/bin/sh
sh /stress.sh "$QUERY_STRING" </dev/null >/dev/null 2>&1 &
printf 'Content-Type: text/plain\\r\\n\\r\\nstarted %s\\n' "$QUERY_STRING"
"""


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
    image_id = build_busybox_image(
        docker_client,
        entrypoint=["/bin/httpd", "-f", "-p", "80", "-h", "/www"],
        cmd=None,
        extra_files={
            "stress.sh": STRESS_SCRIPT,
            "www/index.html": b"stress agent\n",
            "www/cgi-bin/go": GO_SCRIPT,
        },
    )
    with served_image(docker_client, served, image_id, "stress.tar") as tarball:
        yield tarball


@pytest.fixture(scope="module")
def limits_stack(tmp_path_factory: pytest.TempPathFactory, served: FileServer) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("limits"),
        network="agent-runner-limits",
        subnet="172.29.31.0/24",
        bridge="ar-limits0",
        supervisor_args=[
            "--container-memory-limit=64MiB",
            "--container-pids-limit=64",
            "--container-disk-limit=8MiB",
            "--container-shm-limit=8MiB",
            "--container-cpu-limit=0.05",
            "--limit-warning-fraction=0.8",
            "--lifetime-warning-seconds=5",
            "--agent-start-timeout=30",
            "--agent-stop-grace=1",
            "--max-concurrent-starts=4",
            *trusted_sources(served.url("")),
        ],
        api_args=["--rate-limit=1000", "--rate-limit-burst=1000"],
    ) as running:
        yield running


def start(api: httpx.Client, tarball: Tarball, *, lifetime: int, wait: bool) -> dict[str, Any]:
    response = api.post(
        "/v1/agents",
        params={"wait": "true" if wait else "false"},
        json={
            "image_url": tarball.url,
            "image_digest": tarball.digest,
            "lifetime_seconds": lifetime,
        },
    )
    assert response.status_code == 202, response.text
    agent: dict[str, Any] = response.json()
    return agent


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


def timed_get(api: httpx.Client, path: str) -> float:
    began = time.perf_counter()
    response = api.get(path)
    elapsed = time.perf_counter() - began
    assert response.status_code == 200, response.text
    return elapsed


def echo_answers(api: httpx.Client, agent_id: str) -> bool:
    reply = api.post(f"/v1/agents/{agent_id}/http/cgi-bin/echo", content=b"still here")
    return reply.status_code == 200 and "still here" in reply.text


@dataclass
class ProbeRun:
    """Latencies of the echo agent's record GETs, echo checks, and watched agents that ended."""

    latencies: list[float] = field(default_factory=list)
    echo_checks: list[bool] = field(default_factory=list)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)


def probe(
    api: httpx.Client,
    echo_id: str,
    watched: list[str],
    *,
    samples: int | None,
    seconds: float,
) -> ProbeRun:
    """Run the measured request loop for `samples` GETs, or until every watched agent ended."""
    run = ProbeRun()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if samples is not None and len(run.latencies) >= samples:
            break
        if samples is None and len(run.final) == len(watched):
            break
        run.latencies.append(timed_get(api, f"/v1/agents/{echo_id}"))
        if len(run.latencies) % POLL_EVERY == 0:
            run.echo_checks.append(echo_answers(api, echo_id))
            for agent_id in watched:
                agent = api.get(f"/v1/agents/{agent_id}").json()
                if agent["state"] in FINAL_STATES:
                    run.final[agent_id] = agent
        time.sleep(PAUSE)
    return run


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
        for agent_id in agents:
            ready = wait_for_state(api, agent_id, {"ready", "stopped", "failed"}, timeout=60)
            assert ready["state"] == "ready", ready
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
    idle_p99 = p99(idle)
    loaded_p99 = p99(loaded)
    print(
        f"record GET p99: idle {idle_p99 * 1000:.2f} ms over {len(idle)} requests, "
        f"under stress {loaded_p99 * 1000:.2f} ms over {len(loaded)} requests; "
        f"quantiles idle {[round(q * 1000, 2) for q in statistics.quantiles(idle, n=10)]} "
        f"loaded {[round(q * 1000, 2) for q in statistics.quantiles(loaded, n=10)]}"
    )
    assert loaded_p99 <= 2 * idle_p99, (idle_p99, loaded_p99)


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
