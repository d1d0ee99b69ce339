"""Benchmark: start latency and request latency of the echo agent under runc and under runsc.

Run from the repository root: `.venv/bin/python -m bench.runtime [--runs N] [--requests N]`.

The stack (gateway, supervisor under runc, netguard, nats-server) sets up the sandbox
network and its firewall, and one agent started through it loads the image. The measured
containers are then created with the docker SDK from the supervisor's own `create_arguments`
for `--runtime=runc` and for `--runtime=runsc`. Both get the same user, read-only root,
capabilities, seccomp profile, tmpfs, memory and CPU limits, sysctls, init, port and sandbox
network. They differ only in what the runtime needs: under runsc the resolv.conf mount, the
sandbox's pids limit and RLIMIT_NPROC (services/supervisor/gvisor_options.py).

Start: from `docker create` until the agent's published port returns any HTTP response,
polled every `--poll-interval` seconds. Requests: `GET /` straight to the published port, one
at a time, with a new TCP connection each (busybox httpd closes it after each response), on
one container per runtime. The runs alternate between the runtimes, and which goes first
alternates too, so both share the machine's noise. Removing containers is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator

import docker
import docker.errors
import httpx

from bench.harness import (
    Deadline,
    add_stack_arguments,
    echo_session,
    milliseconds,
    percentile,
    run_main,
)
from libs.common.settings import load_settings
from services.supervisor.container_spec import AGENT_PORT, AgentContainer, create_arguments
from services.supervisor.gvisor_options import write_resolv_conf
from services.supervisor.seccomp import load_seccomp_profile
from services.supervisor.settings import SupervisorSettings
from tests.support.stack import Stack

RUNTIMES = ("runc", "runsc")
READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0


class RuntimeStarter:
    """Create echo agent containers under one runtime, with the supervisor's arguments."""

    def __init__(
        self,
        client: docker.DockerClient,
        stack: Stack,
        *,
        runtime: str,
        image_id: str,
        image_digest: str,
    ) -> None:
        self.runtime = runtime
        self._client = client
        self._stack = stack
        self._image_id = image_id
        self._image_digest = image_digest
        self._settings = load_settings(
            SupervisorSettings,
            [
                f"--profile={stack.profile}",
                f"--host-id={stack.host_id}",
                f"--cache-dir={stack.workdir / 'cache'}",
                f"--sandbox-network={stack.network}",
                f"--sandbox-subnet={stack.subnet}",
                f"--sandbox-bridge={stack.bridge}",
                f"--runtime={runtime}",
                "--no-require-gvisor",
            ],
        )
        self._seccomp_profile = load_seccomp_profile(self._settings.seccomp_profile)
        if runtime == "runsc":
            # The stack's supervisor runs under runc, so it wrote no resolv.conf for gVisor.
            write_resolv_conf(self._settings)
        self._probe = httpx.Client(timeout=1.0, trust_env=False)
        self._containers: set[str] = set()

    def start(self, *, poll_interval: float) -> tuple[str, int, float]:
        """Start one container; return its ID, published port and seconds until it responded.

        Raises RuntimeError when it does not respond to HTTP within READY_TIMEOUT seconds.
        """
        agent = AgentContainer(
            agent_id=f"bench-{self.runtime}-{uuid.uuid4().hex[:12]}",
            host_id=self._stack.host_id,
            image_id=self._image_id,
            image_digest=self._image_digest,
        )
        arguments = create_arguments(
            agent, settings=self._settings, seccomp_profile=self._seccomp_profile
        )

        began = time.perf_counter()
        container = self._client.containers.create(**arguments)
        self._containers.add(str(container.id))
        container.start()
        container.reload()
        port = int(container.attrs["NetworkSettings"]["Ports"][AGENT_PORT][0]["HostPort"])
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                self._probe.get(f"http://127.0.0.1:{port}/")
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.runtime} container {str(container.id)[:12]} did not respond on "
                        f"port {port} within {READY_TIMEOUT:g} s"
                    ) from None
            time.sleep(poll_interval)
        return str(container.id), port, time.perf_counter() - began

    def remove(self, container_id: str) -> None:
        """Remove a container as `docker rm -f` does; a missing container is fine."""
        with contextlib.suppress(docker.errors.NotFound):
            self._client.containers.get(container_id).remove(force=True, v=True)
        self._containers.discard(container_id)

    def close(self) -> None:
        """Remove every container this object started and close the probe client."""
        for container_id in sorted(self._containers):
            try:
                self.remove(container_id)
            except docker.errors.APIError as exc:
                print(f"warning: cannot remove container {container_id}: {exc}", file=sys.stderr)
        self._probe.close()


@contextlib.contextmanager
def starters(
    client: docker.DockerClient, stack: Stack, *, image_id: str, image_digest: str
) -> Iterator[dict[str, RuntimeStarter]]:
    """Yield one RuntimeStarter per runtime and remove their containers however it ends."""
    made = {
        runtime: RuntimeStarter(
            client, stack, runtime=runtime, image_id=image_id, image_digest=image_digest
        )
        for runtime in RUNTIMES
    }
    try:
        yield made
    finally:
        for starter in made.values():
            starter.close()


def measure_starts(
    made: dict[str, RuntimeStarter], *, runs: int, poll_interval: float, deadline: Deadline
) -> dict[str, list[float]]:
    """Time `runs` starts per runtime, interleaved; return the seconds per runtime."""
    timings: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
    for run in range(runs):
        deadline.check(f"start run {run + 1} of {runs}")
        order = RUNTIMES if run % 2 == 0 else tuple(reversed(RUNTIMES))
        for runtime in order:
            container_id, _, seconds = made[runtime].start(poll_interval=poll_interval)
            timings[runtime].append(seconds)
            made[runtime].remove(container_id)
        print(
            f"start {run + 1:3d}/{runs}: "
            + ", ".join(f"{name} {timings[name][-1] * 1000:7.1f} ms" for name in RUNTIMES),
            flush=True,
        )
    return timings


def measure_requests(
    ports: dict[str, int], *, requests: int, block: int, deadline: Deadline
) -> dict[str, list[float]]:
    """Time `requests` sequential GET / per runtime in alternating blocks; return seconds."""
    timings: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
    with httpx.Client(timeout=REQUEST_TIMEOUT, trust_env=False) as client:
        for runtime in RUNTIMES:  # warm-up
            for _ in range(min(block, 20)):
                client.get(f"http://127.0.0.1:{ports[runtime]}/")
        round_number = 0
        while len(timings[RUNTIMES[0]]) < requests:
            deadline.check(f"request block {round_number + 1}")
            order = RUNTIMES if round_number % 2 == 0 else tuple(reversed(RUNTIMES))
            count = min(block, requests - len(timings[RUNTIMES[0]]))
            for runtime in order:
                url = f"http://127.0.0.1:{ports[runtime]}/"
                for _ in range(count):
                    began = time.perf_counter()
                    response = client.get(url)
                    elapsed = time.perf_counter() - began
                    if response.status_code != 200:
                        raise RuntimeError(f"GET {url} returned {response.status_code}")
                    timings[runtime].append(elapsed)
            round_number += 1
    return timings


def report(title: str, timings: dict[str, list[float]]) -> None:
    """Print median, p90, p99, extremes per runtime and the runsc/runc ratio of the medians."""
    print()
    print(f"{title}, {len(timings[RUNTIMES[0]])} each (ms)")
    print(f"{'':10}{'median':>8} {'p90':>8} {'p99':>8} {'min':>8} {'max':>8}")
    for runtime in RUNTIMES:
        values = timings[runtime]
        print(
            f"{runtime:10}{milliseconds(percentile(values, 0.5))} "
            f"{milliseconds(percentile(values, 0.9))} {milliseconds(percentile(values, 0.99))} "
            f"{milliseconds(min(values))} {milliseconds(max(values))}"
        )
    ratio = percentile(timings["runsc"], 0.5) / percentile(timings["runc"], 0.5)
    print(f"ratio runsc/runc (medians): {ratio:.2f}")


def run(args: argparse.Namespace) -> None:
    """Set everything up, measure, report and clean up."""
    deadline = Deadline(args.max_seconds)
    with echo_session(args) as session, contextlib.ExitStack() as resources:
        client = session.client
        runtimes = client.info().get("Runtimes") or {}
        if "runsc" not in runtimes:
            raise RuntimeError("dockerd has no runtime 'runsc'; run scripts/deps.sh")
        warm_agent, _ = session.agents.start()
        session.agents.stop(warm_agent["agent_id"])
        made = resources.enter_context(
            starters(
                client,
                session.stack,
                image_id=session.image.image_id,
                image_digest=session.image.digest,
            )
        )
        for starter in made.values():  # warm-up, not measured
            container_id, _, seconds = starter.start(poll_interval=args.poll_interval)
            starter.remove(container_id)
            print(f"warm-up {starter.runtime}: {seconds * 1000:.1f} ms", flush=True)

        starts = measure_starts(
            made, runs=args.runs, poll_interval=args.poll_interval, deadline=deadline
        )
        ports = {}
        for runtime, starter in made.items():
            _, ports[runtime], _ = starter.start(poll_interval=args.poll_interval)
        requests = measure_requests(
            ports, requests=args.requests, block=args.block, deadline=deadline
        )

        report("start, docker create to first HTTP response", starts)
        report("GET / to the published port", requests)
        print(f"image {session.image.image_id}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; raises SystemExit on invalid options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.runtime",
        description="Time start and request latency of the echo agent under runc and runsc.",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=10,
        help="Measured starts per runtime, 1 to 1000 (default: %(default)s).",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=1000,
        help="Measured requests per runtime, 10 to 100000 (default: %(default)s).",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=100,
        help="Requests sent to one runtime before switching, 1 to 10000 (default: %(default)s).",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.02,
        help="Seconds between readiness probes of a starting container, 0.001 to 1 "
        "(default: %(default)s).",
    )
    add_stack_arguments(parser, max_seconds=900.0)
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 1000:
        parser.error(f"--runs must be 1 to 1000, got {args.runs}")
    if not 10 <= args.requests <= 100_000:
        parser.error(f"--requests must be 10 to 100000, got {args.requests}")
    if not 1 <= args.block <= 10_000:
        parser.error(f"--block must be 1 to 10000, got {args.block}")
    if not 0.001 <= args.poll_interval <= 1:
        parser.error(f"--poll-interval must be 0.001 to 1 seconds, got {args.poll_interval}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, or 130 after Ctrl-C or SIGTERM."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
