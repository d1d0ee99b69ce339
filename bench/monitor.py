"""Benchmark: CPU cost of one resource-monitoring round, per agent.

Run from the repository root: `.venv/bin/python -m bench.monitor [--agents N] [--rounds R]`.

It starts N idle busybox containers with the agents' limits (memory, CPU quota, pids, a
/tmp tmpfs and a sized /dev/shm). Then it runs in this process what the supervisor's watch
loop does for them each round: `ResourceMonitor.sample_all` (cgroup files and two tmpfs statvfs
calls per agent), `assess` for each agent and `publish` to the metrics collector. It
measures this process's CPU time (`time.process_time`) over R rounds with N agents and with
none, and prints the difference per agent per round. The watch loop also lists the
containers through the Docker API every round; that listing is timed separately, because it
predates the monitor and costs far more.

The containers carry a label with a random run id and are removed on success, on failure,
on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import docker
import docker.errors

from bench.harness import run_main
from libs.common.settings import load_settings
from services.supervisor.monitor import ResourceMonitor
from services.supervisor.settings import SupervisorSettings
from tests.support.images import build_busybox_image

MIB = 1024 * 1024
LABEL = "io.agent-runner.bench"
REPEATS = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--agents", type=int, default=20, help="Idle containers to sample (default: %(default)s)."
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=200,
        help="Monitoring rounds per measurement. Each measurement is repeated "
        f"{REPEATS} times and the median kept (default: %(default)s).",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.agents <= 200:
        parser.error(f"--agents must be between 1 and 200, got {args.agents}")
    if not 10 <= args.rounds <= 10_000:
        parser.error(f"--rounds must be between 10 and 10000, got {args.rounds}")
    return args


@contextmanager
def idle_containers(client: docker.DockerClient, count: int) -> Iterator[dict[str, str]]:
    """Start `count` idle containers with agent limits and yield agent id -> container id."""
    run_id = uuid.uuid4().hex[:12]
    image_id = build_busybox_image(client, entrypoint=["/bin/sleep"], cmd=["3600"])
    containers: dict[str, str] = {}
    try:
        for index in range(count):
            container = client.containers.run(
                image_id,
                detach=True,
                labels={LABEL: run_id},
                user="65534:65534",
                read_only=True,
                network_mode="none",
                init=True,
                mem_limit=64 * MIB,
                memswap_limit=64 * MIB,
                nano_cpus=100_000_000,
                pids_limit=64,
                shm_size=8 * MIB,
                tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={8 * MIB},mode=1777"},
            )
            containers[f"ag-{index:032x}"] = str(container.id)
        yield containers
    finally:
        for container in client.containers.list(all=True, filters={"label": f"{LABEL}={run_id}"}):
            container.remove(force=True, v=True)
        with suppress(docker.errors.ImageNotFound):
            client.images.remove(image_id, force=True)


def monitor_round(monitor: ResourceMonitor, containers: dict[str, str]) -> None:
    """Run the monitor's part of one watch round for `containers`."""
    samples = monitor.sample_all(containers)
    for agent_id, sample in samples.items():
        monitor.assess(agent_id, sample)
    monitor.publish()


def cpu_per_round(action: Callable[[], object], rounds: int) -> float:
    """Return the median over REPEATS runs of this process's CPU seconds per call of `action`."""
    results = []
    for _ in range(REPEATS):
        began = time.process_time()
        for _ in range(rounds):
            action()
        results.append((time.process_time() - began) / rounds)
    return statistics.median(results)


def run(args: argparse.Namespace) -> None:
    """Measure and print the cost of a monitoring round with and without agents."""
    # The containers run under runc, and under runsc the monitor skips the tmpfs measurement.
    settings = load_settings(SupervisorSettings, ["--runtime=runc", "--no-require-gvisor"])
    client = docker.from_env()
    try:
        with idle_containers(client, args.agents) as containers:
            monitor = ResourceMonitor(settings)
            monitor_round(monitor, containers)
            if len(monitor.sample_all(containers)) != len(containers):
                raise RuntimeError("some containers could not be sampled; see the warnings above")
            empty = cpu_per_round(lambda: monitor_round(monitor, {}), args.rounds)
            full = cpu_per_round(lambda: monitor_round(monitor, containers), args.rounds)

            listing_rounds = max(10, args.rounds // 20)
            list_filter = {"label": f"{LABEL}"}
            listing = cpu_per_round(
                lambda: client.containers.list(all=True, filters=list_filter), listing_rounds
            )
            began = time.perf_counter()
            monitor_round(monitor, containers)
            wall = time.perf_counter() - began
    finally:
        client.close()

    per_agent = (full - empty) / args.agents
    print(f"agents: {args.agents}, rounds: {args.rounds} x {REPEATS} (median kept)")
    print(f"empty round:          {empty * 1e6:8.1f} us CPU")
    print(f"round with agents:    {full * 1e6:8.1f} us CPU, {wall * 1e3:.2f} ms wall")
    print(f"per agent per round:  {per_agent * 1e6:8.1f} us CPU")
    print(
        f"docker list per round ({args.agents} containers, {listing_rounds} x {REPEATS}): "
        f"{listing * 1e6:8.1f} us CPU in this process, "
        f"{listing / args.agents * 1e6:.1f} us per container"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m bench.monitor`."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
