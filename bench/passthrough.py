"""Benchmark: latency of GET / through the gateway's passthrough against GET / on the agent.

Run from the repository root: `.venv/bin/python -m bench.passthrough [--requests N]`.

One echo agent is started through the gateway. Its published port is read from
`docker inspect` of the agent's container. Two httpx clients of the same kind (sync, default
keep-alive pool, no proxies from the environment) then send `GET /` one at a time: one
through `/v1/agents/{id}/http/` with the API key, one straight to 127.0.0.1:<port>. After a
warm-up, the measured requests alternate between the two in blocks, and which goes first
alternates too, so both share the machine's noise. Each time covers sending the request and
reading the whole body.

The echo agent is busybox httpd, which closes the connection after every response. The
direct client therefore opens a new TCP connection per request, and so does the gateway
towards the agent, while the benchmark's connection to the gateway stays open.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import docker
import httpx

from bench.harness import (
    Deadline,
    add_stack_arguments,
    echo_session,
    milliseconds,
    percentile,
    run_main,
)
from services.supervisor.container_spec import AGENT_PORT

TARGET_OVERHEAD_MS = 3.0
REQUEST_TIMEOUT = 10.0


def published_port(client: docker.DockerClient, container_id: str) -> int:
    """Return the host port of the container's port 80; raises RuntimeError if not loopback."""
    bindings = client.containers.get(container_id).attrs["NetworkSettings"]["Ports"][AGENT_PORT]
    if not bindings or bindings[0]["HostIp"] != "127.0.0.1":
        raise RuntimeError(
            f"container {container_id[:12]} publishes port 80 as {bindings!r}, "
            "expected one binding on 127.0.0.1"
        )
    return int(bindings[0]["HostPort"])


def timed_get(client: httpx.Client, path: str) -> float:
    """Send GET `path`, read the body and return the seconds taken.

    Raises RuntimeError on any status other than 200, so errors never count as fast responses.
    """
    began = time.perf_counter()
    response = client.get(path)
    elapsed = time.perf_counter() - began
    if response.status_code != 200:
        raise RuntimeError(f"GET {response.url} returned {response.status_code}: {response.text}")
    return elapsed


def check_same_body(gateway: httpx.Client, gateway_path: str, direct: httpx.Client) -> None:
    """Raise RuntimeError unless both routes return the same body; print the agent's headers."""
    through = gateway.get(gateway_path)
    straight = direct.get("/")
    if through.content != straight.content:
        raise RuntimeError(
            f"the gateway returned {len(through.content)} bytes and the agent "
            f"{len(straight.content)} bytes for GET /"
        )
    print(
        f"GET / returns {len(straight.content)} bytes; agent sends "
        f"Connection: {straight.headers.get('connection', '(none)')}, gateway sends "
        f"Connection: {through.headers.get('connection', '(none)')}",
        flush=True,
    )


def measure(
    gateway: httpx.Client,
    gateway_path: str,
    direct: httpx.Client,
    *,
    requests: int,
    block: int,
    deadline: Deadline,
) -> tuple[list[float], list[float]]:
    """Send `requests` requests on each route in alternating blocks; return both latencies."""
    through: list[float] = []
    straight: list[float] = []
    blocks = -(-requests // block)
    for index in range(blocks):
        deadline.check(f"block {index + 1} of {blocks}")
        size = min(block, requests - index * block)
        routes = [(gateway, gateway_path, through), (direct, "/", straight)]
        if index % 2:
            routes.reverse()
        for client, path, samples in routes:
            samples.extend(timed_get(client, path) for _ in range(size))
    return through, straight


def report(through: list[float], straight: list[float]) -> None:
    """Print p50, p90 and p99 of both routes and the p50 overhead."""
    print()
    print(f"GET /, {len(through)} sequential requests each (ms)")
    print(f"{'':10}{'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for name, samples in (("gateway", through), ("direct", straight)):
        print(
            f"{name:10}{milliseconds(percentile(samples, 0.5))} "
            f"{milliseconds(percentile(samples, 0.9))} "
            f"{milliseconds(percentile(samples, 0.99))} {milliseconds(max(samples))}"
        )
    overhead = (percentile(through, 0.5) - percentile(straight, 0.5)) * 1000
    verdict = "met" if overhead <= TARGET_OVERHEAD_MS else "missed"
    print(f"p50 overhead: {overhead:.2f} ms (target <= {TARGET_OVERHEAD_MS:g} ms: {verdict})")


def run(args: argparse.Namespace) -> None:
    """Set everything up, measure, report and clean up."""
    deadline = Deadline(args.max_seconds)
    with echo_session(args) as session, contextlib.ExitStack() as resources:
        client = session.client
        stack = session.stack
        agents = session.agents

        agent, _ = agents.start()
        port = published_port(client, agent["container_id"])
        gateway = resources.enter_context(
            httpx.Client(
                base_url=stack.api_url,
                headers=stack.headers,
                timeout=REQUEST_TIMEOUT,
                trust_env=False,
            )
        )
        direct = resources.enter_context(
            httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT, trust_env=False
            )
        )
        gateway_path = f"/v1/agents/{agent['agent_id']}/http/"
        check_same_body(gateway, gateway_path, direct)
        print(f"gateway pid {stack.processes['api'].pid}, agent port {port}", flush=True)

        for _ in range(args.warmup):
            timed_get(gateway, gateway_path)
            timed_get(direct, "/")
        through, straight = measure(
            gateway,
            gateway_path,
            direct,
            requests=args.requests,
            block=args.block,
            deadline=deadline,
        )
        report(through, straight)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; raises SystemExit on invalid options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.passthrough",
        description="Time GET / through the gateway's agent passthrough against GET / on the "
        "agent's published port.",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="Measured requests on each route, 1 to 100000 (default: %(default)s).",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="Unmeasured requests on each route first, 0 to 10000 (default: %(default)s).",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=100,
        help="Requests sent on one route before switching to the other, 1 to 10000 "
        "(default: %(default)s).",
    )
    add_stack_arguments(parser, max_seconds=600.0)
    args = parser.parse_args(argv)
    for name, low, high in (("requests", 1, 100_000), ("warmup", 0, 10_000), ("block", 1, 10_000)):
        value = getattr(args, name)
        if not low <= value <= high:
            parser.error(f"--{name} must be {low} to {high}, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, or 130 after Ctrl-C or SIGTERM."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
