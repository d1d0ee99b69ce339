"""Setup shared by the benchmarks: a private stack, the echo agent image, timing and cleanup.

Each benchmark builds the echo agent image, serves its tarball from 127.0.0.1 and runs the
real gateway, supervisor and a private nats-server through tests/support/stack.py. Redis
settings come from var/agent-runner.env, as in the integration tests. The stack gets its own
host id, workdir and sandbox network, so a benchmark can run beside integration tests, and
everything it creates is removed on success, on failure, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import docker
import docker.errors
import httpx

from tests.support.images import build_echo_agent_image, save_image_tarball
from tests.support.stack import REPO_ROOT, FileServer, Stack, running_stack

ENV_FILE = REPO_ROOT / "var" / "agent-runner.env"
# Distinct from the integration tests' network (agent-runner-test, 172.29.0.0/24, ar-test0).
DEFAULT_NETWORK = "agent-runner-bench"
DEFAULT_SUBNET = "172.29.9.0/24"
DEFAULT_BRIDGE = "ar-bench0"
# The echo agent exits on SIGTERM at once; a short grace keeps a stuck stop from stalling a run.
SUPERVISOR_ARGS = ["--agent-stop-grace=2"]
API_ARGS = [
    "--rate-limit=1000000",
    "--rate-limit-burst=1000000",
    "--global-rate-limit=1000000",
    "--global-rate-limit-burst=1000000",
]
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
LOG_TAIL_LINES = 20


def load_env_file() -> None:
    """Copy the Redis and NATS settings that scripts/deps.sh wrote into the environment.

    Variables that are set already win. Raises FileNotFoundError when the file is missing.
    """
    if not ENV_FILE.exists():
        raise FileNotFoundError(f"{ENV_FILE} not found; run: bash scripts/deps.sh")
    for line in ENV_FILE.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            os.environ.setdefault(name, value)


def add_stack_arguments(parser: argparse.ArgumentParser, *, max_seconds: float) -> None:
    """Add the options that place the benchmark's stack and bound its run time."""
    parser.add_argument(
        "--sandbox-network",
        default=DEFAULT_NETWORK,
        help="Docker network that the benchmark's supervisor creates and removes; it must not "
        "exist yet (default: %(default)s).",
    )
    parser.add_argument(
        "--sandbox-subnet",
        default=DEFAULT_SUBNET,
        help="Private subnet of that network; it must not overlap another network "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--sandbox-bridge",
        default=DEFAULT_BRIDGE,
        help="Linux bridge name of that network, at most 15 characters (default: %(default)s).",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=max_seconds,
        help="Stop with an error when the run, setup included, takes longer than this, in "
        "seconds (default: %(default)s).",
    )


class Deadline:
    """A point in time after which a benchmark gives up."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def check(self, step: str) -> None:
        """Raise TimeoutError naming `step` when the deadline has passed."""
        if time.monotonic() > self._end:
            raise TimeoutError(
                f"{step}: the run took longer than {self.seconds:g} s; raise --max-seconds "
                "or lower the counts"
            )


@dataclass(frozen=True)
class EchoImage:
    """The echo agent image and its tarball, served over HTTP on 127.0.0.1."""

    image_id: str
    digest: str
    url: str


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so that cleanup runs as on Ctrl-C."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """Yield a private temporary folder that is removed with everything in it."""
    with tempfile.TemporaryDirectory(prefix="agent-runner-bench-") as path:
        yield Path(path)


@contextlib.contextmanager
def echo_image(client: docker.DockerClient, folder: Path) -> Iterator[EchoImage]:
    """Build the echo agent image, serve its tarball, and remove both afterwards.

    The image is removed by ID without force, so an image still in use by a container that
    the benchmark did not start is left alone and reported.
    """
    image_id = build_echo_agent_image(client)
    try:
        served = folder / "served"
        served.mkdir()
        digest = save_image_tarball(client, image_id, served / "echo.tar")
        server = FileServer(served)
        try:
            yield EchoImage(image_id=image_id, digest=digest, url=server.url("echo.tar"))
        finally:
            server.close()
    finally:
        remove_image(client, image_id)


def remove_image(client: docker.DockerClient, image_id: str) -> None:
    """Remove an image the benchmark built; print a warning when Docker refuses."""
    try:
        client.images.remove(image_id)
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.APIError as exc:
        print(f"warning: cannot remove image {image_id}: {exc}", file=sys.stderr)


@contextlib.contextmanager
def bench_stack(
    client: docker.DockerClient,
    folder: Path,
    args: argparse.Namespace,
    *,
    image_url: str,
    netguard_args: list[str] | None = None,
) -> Iterator[Stack]:
    """Run a gateway, a supervisor, netguard and a nats-server on the benchmark's own network.

    `netguard_args` are extra command-line flags for netguard. Raises RuntimeError when the
    network exists already, because the stack removes its network when it stops and must not
    take one that another run is using. On an error, the last lines of the services' logs are
    printed before the stack is removed.
    """
    if any(net.name == args.sandbox_network for net in client.networks.list()):
        raise RuntimeError(
            f"Docker network {args.sandbox_network!r} exists already; another benchmark may be "
            "using it. Pass --sandbox-network, --sandbox-subnet and --sandbox-bridge to pick "
            "another one"
        )
    source = urlsplit(image_url)
    with running_stack(
        folder / "stack",
        # The image comes from a loopback file server, which the supervisor refuses unless a
        # trusted source names it.
        supervisor_args=[
            *SUPERVISOR_ARGS,
            f"--trusted-image-sources={source.scheme}://{source.netloc}/",
        ],
        # One benchmark client sends thousands of requests a second from one address.
        api_args=API_ARGS,
        host_id=f"bench-{uuid.uuid4().hex[:8]}",
        network=args.sandbox_network,
        subnet=args.sandbox_subnet,
        bridge=args.sandbox_bridge,
        netguard_args=list(netguard_args or []),
    ) as stack:
        try:
            yield stack
        except Exception:
            _print_log_tails(stack)
            raise


def _print_log_tails(stack: Stack) -> None:
    for name in ("supervisor", "netguard", "api"):
        with contextlib.suppress(OSError):
            lines = stack.log_text(name).splitlines()[-LOG_TAIL_LINES:]
            print(f"--- last lines of the {name} log ---", file=sys.stderr)
            print("\n".join(lines), file=sys.stderr)


class Agents:
    """Start agents through the gateway and stop every one of them again."""

    def __init__(self, api: httpx.Client, image: EchoImage) -> None:
        self._api = api
        self._image = image
        self._running: set[str] = set()

    def start(self) -> tuple[dict[str, Any], float]:
        """Start an agent with `?wait=true`; return it and the seconds until the reply.

        Raises RuntimeError when the gateway rejects the start or the agent is not ready.
        """
        body = {"image_url": self._image.url, "image_digest": self._image.digest}
        began = time.perf_counter()
        response = self._api.post(
            "/v1/agents", params={"wait": "true"}, json=body, timeout=START_TIMEOUT
        )
        elapsed = time.perf_counter() - began
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/agents returned {response.status_code}: {response.text}")
        agent: dict[str, Any] = response.json()
        self._running.add(agent["agent_id"])
        if agent["state"] != "ready":
            raise RuntimeError(
                f"agent {agent['agent_id']} is {agent['state']!r}, expected 'ready': "
                f"{agent.get('failure_reason')}: {agent.get('failure_message')}"
            )
        return agent, elapsed

    def stop(self, agent_id: str) -> None:
        """Stop an agent; raises RuntimeError when the gateway does not confirm the stop."""
        response = self._api.delete(f"/v1/agents/{agent_id}", timeout=STOP_TIMEOUT)
        if response.status_code != 200:
            raise RuntimeError(
                f"DELETE /v1/agents/{agent_id} returned {response.status_code}: {response.text}"
            )
        self._running.discard(agent_id)

    def stop_all(self) -> None:
        """Stop the agents that are still running, printing errors instead of raising them.

        After Ctrl-C the gateway may have exited already. The stack then removes the
        containers by label, but their records stay in Redis with their last state.
        """
        for agent_id in sorted(self._running):
            try:
                self.stop(agent_id)
            except (httpx.HTTPError, RuntimeError) as exc:
                print(f"warning: cannot stop agent {agent_id}: {exc}", file=sys.stderr)


@contextlib.contextmanager
def stopping_agents(api: httpx.Client, image: EchoImage) -> Iterator[Agents]:
    """Yield an Agents helper and stop whatever it started, however the block ends."""
    agents = Agents(api, image)
    try:
        yield agents
    finally:
        agents.stop_all()


@dataclass(frozen=True)
class EchoSession:
    """What a benchmark of the echo agent works with; all of it is cleaned up after."""

    client: docker.DockerClient
    image: EchoImage
    stack: Stack
    api: httpx.Client
    agents: Agents


@contextlib.contextmanager
def echo_session(args: argparse.Namespace) -> Iterator[EchoSession]:
    """Build the echo image, start a stack and yield a client of its gateway."""
    with contextlib.ExitStack() as resources:
        folder = resources.enter_context(workdir())
        client = docker.from_env(timeout=120)
        resources.callback(client.close)
        image = resources.enter_context(echo_image(client, folder))
        stack = resources.enter_context(bench_stack(client, folder, args, image_url=image.url))
        api = resources.enter_context(
            httpx.Client(base_url=stack.api_url, headers=stack.headers, trust_env=False)
        )
        agents = resources.enter_context(stopping_agents(api, image))
        yield EchoSession(client=client, image=image, stack=stack, api=api, agents=agents)


def run_main(
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], None],
    argv: list[str] | None,
) -> int:
    """Parse arguments and run a benchmark; return 0, or 130 after Ctrl-C or SIGTERM."""
    args = parse_args(argv)
    load_env_file()
    try:
        with interrupts_raise():
            run(args)
    except KeyboardInterrupt:
        print("interrupted; cleanup finished", file=sys.stderr)
        return 130
    return 0


def percentile(samples: list[float], fraction: float) -> float:
    """Return the `fraction` quantile (0 to 1) of `samples`, interpolating between ranks.

    This is the "linear" method of numpy.percentile. Raises ValueError for no samples.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * fraction
    lower = math.floor(position)
    upper = math.ceil(position)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def milliseconds(seconds: float) -> str:
    """Format a duration in seconds as milliseconds with one decimal."""
    return f"{seconds * 1000:8.1f}"
