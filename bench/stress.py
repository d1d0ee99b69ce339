"""Benchmark: the gateway's latency while ten agents hit their limits, against its idle latency.

Run from the repository root: `.venv/bin/python -m bench.stress [--rounds 3]`.

One stack runs with the small limits of the limit tests (tests/support/stress.py) and trusts
the loopback file server that serves the echo and stress images. Each round starts an echo
agent and ten stress agents, two of each kind (fork bomb, memory bomb, /tmp fill, /dev/shm
fill, CPU spin). Every agent gets its image from the tarball, and only the CPU spin gets a
short lifetime. The probe loop of the limit test measures `GET /v1/agents/{echo}` three
times. The runs before the stresses start and after every stress agent ended are pooled as
the idle sample. The run from the moment all stresses are triggered until every stress agent
ended is the loaded sample. The round prints p50, p90 and p99 of both (the "exclusive"
method of `statistics.quantiles`, as in the test) and the p99 ratio loaded/idle against the
target of 2. It splits the loaded sample into requests begun while a stress agent was being
stopped (STOP_WINDOW around its stopped_at) and the rest. It also prints the stop reason of
each stress agent and how many of the echo agent's checks succeeded.

Rounds reuse the stack and the images; agents are new each round. Everything the benchmark
creates (agents, containers, network, images, tarballs, folder) is removed on success, on
failure, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import docker
import docker.errors
import httpx

from bench.harness import (
    API_ARGS,
    Deadline,
    add_stack_arguments,
    remove_image,
    run_main,
    workdir,
)
from tests.integration.conftest import Tarball, make_tarball, trusted_sources
from tests.support.images import build_echo_agent_image
from tests.support.stack import FileServer, Stack, running_stack, wait_for_state
from tests.support.stress import (
    CPU_LIFETIME,
    EXPECTED,
    FINAL_STATES,
    LATENCY_SAMPLES,
    POLL_EVERY,
    STRESS_DEADLINE,
    SUPERVISOR_LIMIT_ARGS,
    build_stress_image,
    echo_answers,
    probe,
    start,
)

TARGET_RATIO = 2.0
STRESS_LIFETIME = 300
ECHO_LIFETIME = 600
READY_TIMEOUT = 60.0
IDLE_SECONDS = 60.0
LOG_TAIL_LINES = 20
# Seconds before and after an agent's stopped_at during which its stop is under way: the
# supervisor's decision, Docker's stop with --agent-stop-grace 1, removal and the record.
STOP_WINDOW = (3.0, 0.5)


@dataclass(frozen=True)
class Images:
    """Tarballs of the echo and stress images, served from one loopback file server."""

    echo: Tarball
    stress: Tarball
    server_url: str


@dataclass
class Round:
    """Measurements of one round, latencies in seconds."""

    idle: list[float]
    loaded: list[float]
    stop_reasons: dict[str, collections.Counter[str]]
    unfinished: list[str]
    echo_checks: list[bool]
    echo_alive: bool
    # Loaded latencies split by whether the request began while a stress agent was being
    # stopped (STOP_WINDOW around its stopped_at), to test whether the stops cause the tail.
    near_stops: list[float]
    away_from_stops: list[float]

    @property
    def ratio(self) -> float:
        """Loaded p99 divided by idle p99."""
        return quantiles(self.loaded)[2] / quantiles(self.idle)[2]


def quantiles(latencies: list[float]) -> tuple[float, float, float]:
    """Return p50, p90 and p99 by the method that the limit test uses for its p99."""
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49], cuts[89], cuts[98]


@contextlib.contextmanager
def served_images(client: docker.DockerClient, folder: Path) -> Iterator[Images]:
    """Build both images, serve their tarballs, and remove images and tarballs afterwards.

    make_tarball removes each built image, so the supervisor loads it from the tarball. The
    stack loads it under the same ID, which is removed here after the stack has stopped.
    """
    served = folder / "served"
    served.mkdir()
    server = FileServer(served)
    image_ids: list[str] = []
    try:
        echo_id = build_echo_agent_image(client)
        image_ids.append(echo_id)
        echo = make_tarball(client, server, echo_id, "echo.tar")
        stress_id = build_stress_image(client)
        image_ids.append(stress_id)
        stress = make_tarball(client, server, stress_id, "stress.tar")
        yield Images(echo=echo, stress=stress, server_url=server.url(""))
    finally:
        server.close()
        for image_id in image_ids:
            remove_image(client, image_id)


@contextlib.contextmanager
def stress_stack(
    client: docker.DockerClient, folder: Path, args: argparse.Namespace, images: Images
) -> Iterator[Stack]:
    """Run a stack with the limit tests' supervisor flags on the benchmark's own network.

    Raises RuntimeError when the network exists already. On an error, the last lines of the
    services' logs are printed before the stack is removed.
    """
    if any(net.name == args.sandbox_network for net in client.networks.list()):
        raise RuntimeError(
            f"Docker network {args.sandbox_network!r} exists already; another benchmark may be "
            "using it. Pass --sandbox-network, --sandbox-subnet and --sandbox-bridge to pick "
            "another one"
        )
    with running_stack(
        folder / "stack",
        supervisor_args=[*SUPERVISOR_LIMIT_ARGS, *trusted_sources(images.server_url)],
        api_args=API_ARGS,
        host_id=f"bench-{uuid.uuid4().hex[:8]}",
        network=args.sandbox_network,
        subnet=args.sandbox_subnet,
        bridge=args.sandbox_bridge,
    ) as stack:
        try:
            yield stack
        except Exception:
            for name in ("supervisor", "netguard", "api"):
                with contextlib.suppress(OSError):
                    lines = stack.log_text(name).splitlines()[-LOG_TAIL_LINES:]
                    print(f"--- last lines of the {name} log ---", file=sys.stderr)
                    print("\n".join(lines), file=sys.stderr)
            raise


@contextlib.contextmanager
def stopping(api: httpx.Client) -> Iterator[list[str]]:
    """Yield a list for agent IDs, and stop those that have not ended when the block ends."""
    agent_ids: list[str] = []
    try:
        yield agent_ids
    finally:
        for agent_id in agent_ids:
            try:
                agent = api.get(f"/v1/agents/{agent_id}").json()
                if agent.get("state") not in FINAL_STATES:
                    api.delete(f"/v1/agents/{agent_id}")
            except httpx.HTTPError as exc:
                print(f"warning: cannot stop agent {agent_id}: {exc}", file=sys.stderr)


def run_round(api: httpx.Client, images: Images, deadline: Deadline) -> Round:
    """Start the agents, measure idle, stressed and idle again; return the measurements.

    Raises RuntimeError when an agent does not become ready, a stress agent ends before its
    stress starts, or the gateway rejects the request that starts a stress.
    """
    with stopping(api) as started:
        echo = start(api, images.echo, lifetime=ECHO_LIFETIME, wait=True)
        started.append(echo["agent_id"])
        if echo["state"] != "ready":
            raise RuntimeError(
                f"echo agent is {echo['state']!r}, expected 'ready'; see the log tails below: "
                f"{echo}"
            )
        kinds: dict[str, str] = {}
        for kind in [kind for kind in EXPECTED for _ in range(2)]:
            lifetime = CPU_LIFETIME if kind == "cpu" else STRESS_LIFETIME
            agent = start(api, images.stress, lifetime=lifetime, wait=False)
            started.append(agent["agent_id"])
            kinds[agent["agent_id"]] = kind
        for agent_id, kind in kinds.items():
            agent = wait_for_state(api, agent_id, {"ready", *FINAL_STATES}, timeout=READY_TIMEOUT)
            if agent["state"] != "ready":
                raise RuntimeError(
                    f"{kind} agent {agent_id} is {agent['state']!r}, expected 'ready'; see the "
                    f"log tails below: {agent}"
                )
        deadline.check("starting the agents")

        watched = list(kinds)
        echo_id = echo["agent_id"]
        # The first requests open the connection and warm the gateway's caches.
        probe(api, echo_id, watched, samples=POLL_EVERY, seconds=IDLE_SECONDS)
        before = probe(api, echo_id, watched, samples=LATENCY_SAMPLES, seconds=IDLE_SECONDS)
        if before.final:
            raise RuntimeError(f"stress agents ended before their stress began: {before.final}")

        for agent_id, kind in kinds.items():
            reply = api.get(f"/v1/agents/{agent_id}/http/cgi-bin/go?{kind}")
            if reply.status_code != 200:
                raise RuntimeError(
                    f"starting the {kind} stress of {agent_id} returned {reply.status_code}: "
                    f"{reply.text}"
                )
        loaded = probe(api, echo_id, watched, samples=None, seconds=STRESS_DEADLINE)
        deadline.check("measuring under stress")

        after = probe(api, echo_id, watched, samples=LATENCY_SAMPLES, seconds=IDLE_SECONDS)
        echo_alive = echo_answers(api, echo_id)

    stop_reasons: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for agent_id, agent in loaded.final.items():
        stop_reasons[kinds[agent_id]][str(agent.get("stop_reason"))] += 1
    stops = [
        datetime.fromisoformat(agent["stopped_at"]).timestamp()
        for agent in loaded.final.values()
        if agent.get("stopped_at")
    ]
    near, away = split_by_stops(loaded.began, loaded.latencies, stops)
    return Round(
        idle=before.latencies + after.latencies,
        loaded=loaded.latencies,
        stop_reasons=dict(stop_reasons),
        unfinished=sorted(set(kinds) - set(loaded.final)),
        echo_checks=loaded.echo_checks,
        echo_alive=echo_alive,
        near_stops=near,
        away_from_stops=away,
    )


def split_by_stops(
    began: list[float], latencies: list[float], stops: list[float]
) -> tuple[list[float], list[float]]:
    """Split latencies into those of requests begun within STOP_WINDOW of a stop, and the rest."""
    before, after = STOP_WINDOW
    near, away = [], []
    for moment, latency in zip(began, latencies, strict=True):
        if any(stop - before <= moment <= stop + after for stop in stops):
            near.append(latency)
        else:
            away.append(latency)
    return near, away


def report_round(number: int, result: Round) -> None:
    """Print one round's latencies, ratio, stop reasons and the echo agent's checks."""
    print(f"round {number}: GET /v1/agents/{{echo}} (ms)")
    print(f"  {'':8}{'requests':>9} {'p50':>7} {'p90':>7} {'p99':>7}")
    for name, latencies in (("idle", result.idle), ("loaded", result.loaded)):
        p50, p90, p99 = quantiles(latencies)
        print(
            f"  {name:8}{len(latencies):9d} {p50 * 1000:7.2f} {p90 * 1000:7.2f} {p99 * 1000:7.2f}"
        )
    for name, latencies in (
        ("near stops", result.near_stops),
        ("elsewhere", result.away_from_stops),
    ):
        if len(latencies) >= 2:
            p50, p90, p99 = quantiles(latencies)
            print(
                f"  {name:10}{len(latencies):7d} {p50 * 1000:7.2f} {p90 * 1000:7.2f} "
                f"{p99 * 1000:7.2f}  (loaded, by time)"
            )
    verdict = "met" if result.ratio <= TARGET_RATIO else "missed"
    print(f"  p99 loaded/idle: {result.ratio:.2f} (target <= {TARGET_RATIO:g}: {verdict})")

    for kind, (expected, _) in EXPECTED.items():
        counts = result.stop_reasons.get(kind, collections.Counter())
        reasons = ", ".join(f"{reason} x{count}" for reason, count in sorted(counts.items()))
        mark = "ok" if counts == collections.Counter({expected: 2}) else f"expected {expected}"
        print(f"  {kind:7} {reasons or 'none ended'} ({mark})")
    if result.unfinished:
        print(f"  still running after {STRESS_DEADLINE:g} s: {', '.join(result.unfinished)}")
    answered = sum(result.echo_checks)
    print(
        f"  echo agent: answered {answered} of {len(result.echo_checks)} checks under stress, "
        f"{'answered' if result.echo_alive else 'did not answer'} after"
    )


def run(args: argparse.Namespace) -> None:
    """Set everything up, run the rounds, print each and the median ratio, and clean up."""
    deadline = Deadline(args.max_seconds)
    with contextlib.ExitStack() as resources:
        folder = resources.enter_context(workdir())
        client = docker.from_env(timeout=120)
        resources.callback(client.close)
        images = resources.enter_context(served_images(client, folder))
        stack = resources.enter_context(stress_stack(client, folder, args, images))
        api = resources.enter_context(
            httpx.Client(base_url=stack.api_url, headers=stack.headers, timeout=60, trust_env=False)
        )

        ratios = []
        for number in range(1, args.rounds + 1):
            deadline.check(f"round {number} of {args.rounds}")
            result = run_round(api, images, deadline)
            report_round(number, result)
            ratios.append(result.ratio)

    median = statistics.median(ratios)
    verdict = "met" if median <= TARGET_RATIO else "missed"
    listed = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    print(
        f"p99 loaded/idle over {len(ratios)} rounds: {listed}; median {median:.2f} "
        f"(target <= {TARGET_RATIO:g}: {verdict})"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; raises SystemExit on invalid options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.stress",
        description="Measure the gateway's p99 latency while ten agents hit their limits, "
        "against its idle p99 in the same run.",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Times to run the whole scenario with new agents, 1 to 20 (default: %(default)s).",
    )
    add_stack_arguments(parser, max_seconds=900.0)
    parser.set_defaults(
        sandbox_network="agent-runner-stressb",
        sandbox_subnet="172.29.47.0/24",
        sandbox_bridge="ar-stressb0",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20:
        parser.error(f"--rounds must be 1 to 20, got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, or 130 after Ctrl-C or SIGTERM."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
