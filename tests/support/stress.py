"""Misbehaving agents for the limit tests and the stress benchmark.

A stress agent runs busybox httpd, so it becomes ready like any agent; a request to
`/cgi-bin/go?<kind>` then starts its stress: a fork bomb, a memory bomb, a /tmp or /dev/shm
fill, or a CPU spin. `probe` is the request loop both measure the gateway with: a GET of the
echo agent's record every 10 ms and, every 25th time, a request to the echo agent and a GET
of each watched agent's record.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import docker
import httpx

from tests.integration.conftest import Tarball
from tests.support.images import build_busybox_image
from tests.support.stack import agent_runtime

MIB = 1024 * 1024
# The CPU spin has no limit to hit and ends with its lifetime, which must outlast the start of
# all ten agents and the idle measurement: under gVisor, sandboxes boot slowly at 0.05 CPU.
CPU_LIFETIME = 20 if agent_runtime() == "runc" else 45
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


# Limits small enough that every stress reaches its own within seconds. Under gVisor each guest
# process also costs the sandbox host memory, and a fork bomb of 64 came within reach of the
# 64 MiB memory limit before its count was read, so it gets 32 there.
SUPERVISOR_LIMIT_ARGS = (
    "--container-memory-limit=64MiB",
    f"--container-pids-limit={64 if agent_runtime() == 'runc' else 32}",
    "--container-disk-limit=8MiB",
    "--container-shm-limit=8MiB",
    "--container-cpu-limit=0.05",
    "--limit-warning-fraction=0.8",
    "--lifetime-warning-seconds=5",
    "--agent-start-timeout=30",
    "--agent-stop-grace=1",
    "--max-concurrent-starts=4",
)


def build_stress_image(client: docker.DockerClient) -> str:
    """Build the stress agent's image and return its ID."""
    return build_busybox_image(
        client,
        entrypoint=["/bin/httpd", "-f", "-p", "80", "-h", "/www"],
        cmd=None,
        extra_files={
            "stress.sh": STRESS_SCRIPT,
            "www/index.html": b"stress agent\n",
            "www/cgi-bin/go": GO_SCRIPT,
        },
    )


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
    # Wall-clock time at which each measured request began, in step with `latencies`.
    began: list[float] = field(default_factory=list)
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
        run.began.append(time.time())
        run.latencies.append(timed_get(api, f"/v1/agents/{echo_id}"))
        if len(run.latencies) % POLL_EVERY == 0:
            run.echo_checks.append(echo_answers(api, echo_id))
            for agent_id in watched:
                agent = api.get(f"/v1/agents/{agent_id}").json()
                if agent["state"] in FINAL_STATES:
                    run.final[agent_id] = agent
        time.sleep(PAUSE)
    return run
