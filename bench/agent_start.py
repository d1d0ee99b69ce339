"""Benchmark: agent create-to-ready through the gateway against plain Docker, same flags.

Run from the repository root: `.venv/bin/python -m bench.agent_start [--runs N]`.

Product: `POST /v1/agents?wait=true`, timed from sending the request until the response
whose state is `ready`. Behind it the gateway stores the record and sends the start to a
supervisor over NATS. The supervisor finds the cached image, creates and starts the container
and polls the agent's port until it responds to HTTP.

Baseline: the same image ID started with the docker SDK from the supervisor's own
`create_arguments` (the same user, read-only root, capabilities, seccomp profile, tmpfs,
limits, sysctl, init, port and sandbox network), then `docker inspect` for the published port
and a poll of `GET /` on it until any HTTP response, with the supervisor's probe timeout.
The baseline polls at a fixed `--poll-interval`, while the supervisor backs off from 20 ms to
250 ms between probes, so that backoff counts as product overhead.

One warm-up start of each comes first, so the tarball is cached and the image loaded. The
measured starts alternate between product and baseline, and which goes first alternates too,
so both share the machine's noise. Stopping (DELETE, `docker rm -f`) is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import docker
import docker.errors
import httpx

from bench.harness import (
    Agents,
    Deadline,
    add_stack_arguments,
    echo_session,
    milliseconds,
    percentile,
    run_main,
)
from libs.common.settings import load_settings
from services.supervisor.container_spec import AGENT_PORT, AgentContainer, create_arguments
from services.supervisor.lifecycle import READY_PROBE_TIMEOUT
from services.supervisor.seccomp import load_seccomp_profile
from services.supervisor.settings import SupervisorSettings
from tests.support.stack import Stack

TARGET_RATIO = 1.3
BASELINE_READY_TIMEOUT = 30.0
# HostConfig fields that may differ between two containers made from the same arguments.
_PER_CONTAINER_FIELDS = frozenset({"ContainerIDFile"})


@dataclass
class Timings:
    """Seconds per measured start, and the phases of each start where known."""

    total: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def add(self, total: float, phases: dict[str, float]) -> None:
        """Record one start."""
        self.total.append(total)
        for name, seconds in phases.items():
            self.phases.setdefault(name, []).append(seconds)


class PlainDocker:
    """Start the image the way the supervisor does, without the gateway and supervisor."""

    def __init__(
        self, client: docker.DockerClient, stack: Stack, *, image_id: str, image_digest: str
    ) -> None:
        self._client = client
        self._stack = stack
        self._image_id = image_id
        self._image_digest = image_digest
        self._settings = _supervisor_settings(stack)
        self._seccomp_profile = load_seccomp_profile(self._settings.seccomp_profile)
        self._probe = httpx.Client(timeout=READY_PROBE_TIMEOUT, trust_env=False)
        self._containers: set[str] = set()

    def start(self, *, poll_interval: float) -> tuple[str, float, dict[str, float]]:
        """Create, start and wait for one container; return its ID, seconds and phases.

        Raises RuntimeError when the container does not respond to HTTP within 30 s.
        """
        agent = AgentContainer(
            agent_id=f"baseline-{uuid.uuid4().hex[:12]}",
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
        started = time.perf_counter()

        self._wait_ready(container, port, poll_interval=poll_interval)
        ready = time.perf_counter()
        phases = {"start": started - began, "ready": ready - started}
        return str(container.id), ready - began, phases

    def _wait_ready(self, container: Any, port: int, *, poll_interval: float) -> None:
        deadline = time.monotonic() + BASELINE_READY_TIMEOUT
        url = f"http://127.0.0.1:{port}/"
        while time.monotonic() < deadline:
            try:
                self._probe.get(url)
                return
            except httpx.HTTPError:
                pass  # not listening yet; any HTTP response counts, as in the supervisor
            time.sleep(poll_interval)
        container.reload()
        raise RuntimeError(
            f"baseline container {container.id[:12]} ({container.status}) did not respond to "
            f"HTTP on port {port} within {BASELINE_READY_TIMEOUT:g} s"
        )

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


def _supervisor_settings(stack: Stack) -> SupervisorSettings:
    # The same flags the stack passes to its supervisor, read by the same loader.
    return load_settings(
        SupervisorSettings,
        [
            f"--profile={stack.profile}",
            f"--host-id={stack.host_id}",
            f"--cache-dir={stack.workdir / 'cache'}",
            f"--sandbox-network={stack.network}",
            f"--sandbox-subnet={stack.subnet}",
            f"--sandbox-bridge={stack.bridge}",
            *stack.supervisor_args,
        ],
    )


@contextlib.contextmanager
def plain_docker(
    client: docker.DockerClient, stack: Stack, *, image_id: str, image_digest: str
) -> Iterator[PlainDocker]:
    """Yield a PlainDocker and remove its containers however the block ends."""
    baseline = PlainDocker(client, stack, image_id=image_id, image_digest=image_digest)
    try:
        yield baseline
    finally:
        baseline.close()


def check_same_container_config(
    client: docker.DockerClient, product_id: str, baseline_id: str
) -> None:
    """Raise RuntimeError unless both containers run the same image with the same HostConfig."""
    product = client.containers.get(product_id).attrs
    baseline = client.containers.get(baseline_id).attrs
    differences = sorted(
        name
        for name in set(product["HostConfig"]) | set(baseline["HostConfig"])
        if name not in _PER_CONTAINER_FIELDS
        and product["HostConfig"].get(name) != baseline["HostConfig"].get(name)
    )
    for name in ("Image", "User", "Entrypoint", "Cmd", "Hostname"):
        if product["Config"].get(name) != baseline["Config"].get(name):
            differences.append(f"Config.{name}")
    if product["Image"] != baseline["Image"]:
        differences.append("Image")
    if differences:
        raise RuntimeError(
            f"product container {product_id[:12]} and baseline container {baseline_id[:12]} "
            f"differ in {differences}; the comparison would not be fair"
        )


def product_phases(agent: dict[str, Any], total: float) -> dict[str, float]:
    """Split a product start into phases by the record's timestamps, in seconds.

    `accept and start` runs from the gateway storing the record to the container running
    (NATS, Redis, image lookup, docker create and start), `ready` until the agent responded,
    and `reply` is what is left of the client's time.
    """
    created = datetime.fromisoformat(agent["created_at"])
    started = datetime.fromisoformat(agent["started_at"])
    ready = datetime.fromisoformat(agent["ready_at"])
    start = (started - created).total_seconds()
    wait = (ready - started).total_seconds()
    return {"accept and start": start, "ready": wait, "reply": total - start - wait}


def measure(
    agents: Agents,
    baseline: PlainDocker,
    *,
    runs: int,
    poll_interval: float,
    deadline: Deadline,
) -> tuple[Timings, Timings]:
    """Time `runs` starts of each kind, interleaved; return product and baseline timings."""
    product = Timings()
    plain = Timings()

    def product_once() -> None:
        agent, seconds = agents.start()
        product.add(seconds, product_phases(agent, seconds))
        agents.stop(agent["agent_id"])

    def baseline_once() -> None:
        container_id, seconds, phases = baseline.start(poll_interval=poll_interval)
        plain.add(seconds, phases)
        baseline.remove(container_id)

    for run in range(runs):
        deadline.check(f"run {run + 1} of {runs}")
        order = (product_once, baseline_once) if run % 2 == 0 else (baseline_once, product_once)
        for step in order:
            step()
        print(
            f"run {run + 1:3d}/{runs}: product {product.total[-1] * 1000:7.1f} ms, "
            f"baseline {plain.total[-1] * 1000:7.1f} ms",
            flush=True,
        )
    return product, plain


def report(product: Timings, plain: Timings) -> None:
    """Print medians, p90, extremes, product phases and the ratio of the medians."""
    print()
    print(f"agent create-to-ready, {len(product.total)} runs each (ms)")
    print(f"{'':22}{'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    rows: list[tuple[str, list[float]]] = [("product", product.total)]
    rows += [(f"  {name}", values) for name, values in product.phases.items()]
    rows.append(("baseline", plain.total))
    rows += [(f"  {name}", values) for name, values in plain.phases.items()]
    for name, values in rows:
        print(
            f"{name:22}{milliseconds(percentile(values, 0.5))} "
            f"{milliseconds(percentile(values, 0.9))} "
            f"{milliseconds(min(values))} {milliseconds(max(values))}"
        )
    ratio = percentile(product.total, 0.5) / percentile(plain.total, 0.5)
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    print(f"ratio product/baseline (medians): {ratio:.2f} (target <= {TARGET_RATIO}: {verdict})")


def run(args: argparse.Namespace) -> None:
    """Set everything up, measure, report and clean up."""
    deadline = Deadline(args.max_seconds)
    with echo_session(args) as session, contextlib.ExitStack() as resources:
        client = session.client
        image = session.image
        stack = session.stack
        agents = session.agents

        warm_agent, warm_seconds = agents.start()
        if warm_agent["image_id"] != image.image_id:
            raise RuntimeError(
                f"supervisor loaded {warm_agent['image_id']}, expected {image.image_id}"
            )
        baseline = resources.enter_context(
            plain_docker(client, stack, image_id=image.image_id, image_digest=image.digest)
        )
        warm_container, warm_baseline_seconds, _ = baseline.start(poll_interval=args.poll_interval)
        check_same_container_config(client, warm_agent["container_id"], warm_container)
        baseline.remove(warm_container)
        agents.stop(warm_agent["agent_id"])
        print(
            f"warm-up: product {warm_seconds * 1000:.1f} ms (download, checks and load), "
            f"baseline {warm_baseline_seconds * 1000:.1f} ms; same HostConfig",
            flush=True,
        )

        product, plain = measure(
            agents, baseline, runs=args.runs, poll_interval=args.poll_interval, deadline=deadline
        )
        report(product, plain)
        print(f"image {image.image_id}, tarball {image.digest}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; raises SystemExit on invalid options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.agent_start",
        description="Time agent create-to-ready through the gateway against plain docker "
        "with the same hardening flags.",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=10,
        help="Measured starts of each kind, 1 to 1000 (default: %(default)s).",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.02,
        help="Seconds between the baseline's readiness probes, 0.001 to 1; the supervisor's "
        "first delay is 0.02 (default: %(default)s).",
    )
    add_stack_arguments(parser, max_seconds=900.0)
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 1000:
        parser.error(f"--runs must be 1 to 1000, got {args.runs}")
    if not 0.001 <= args.poll_interval <= 1:
        parser.error(f"--poll-interval must be 0.001 to 1 seconds, got {args.poll_interval}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, or 130 after Ctrl-C or SIGTERM."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
