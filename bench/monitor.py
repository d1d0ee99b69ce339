"""Benchmark: CPU cost of one resource-monitoring round, per agent.

Run from the repository root:
`.venv/bin/python -m bench.monitor [--agents N] [--rounds R] [--runtime runc|runsc]`.

It starts N idle busybox containers with the agents' limits (memory, CPU quota, pids, a
/tmp tmpfs and a sized /dev/shm; under runsc the two host tmpfs volumes and RLIMIT_NPROC
that the supervisor gives agents there). Then it runs in this process what the supervisor's
watch loop does for them each round: `ResourceMonitor.sample_all` (cgroup files and two tmpfs
statvfs calls per agent, and under runsc the background `runsc events` runs), `assess` for
each agent and `publish` to the metrics collector. It measures the CPU time of this process
and of its reaped children over R rounds with N agents and with none, and prints the
difference per agent per round. Under runsc it also times single `runsc events --stats` runs,
because the rounds here follow each other without the watch loop's pause, so how often runsc
runs per round differs from a supervisor's. The watch loop also lists the containers through
the Docker API every round; that listing is timed separately, because it predates the
monitor and costs far more.

The containers carry a label with a random run id and are removed on success, on failure,
on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import docker
import docker.errors

from bench.harness import run_main
from libs.common.settings import load_settings
from services.supervisor.docker_adapter import DockerAdapter
from services.supervisor.gvisor_options import SHM, TMP, tmpfs_volume
from services.supervisor.gvisor_stats import GvisorTasks
from services.supervisor.monitor import TASK_REFRESH_ROUNDS, ResourceMonitor
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
    parser.add_argument(
        "--runtime",
        choices=("runc", "runsc"),
        default="runc",
        help="Runtime of the containers and the monitor (default: %(default)s).",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.agents <= 200:
        parser.error(f"--agents must be between 1 and 200, got {args.agents}")
    if not 10 <= args.rounds <= 10_000:
        parser.error(f"--rounds must be between 10 and 10000, got {args.rounds}")
    return args


@contextmanager
def idle_containers(
    client: docker.DockerClient, count: int, settings: SupervisorSettings
) -> Iterator[dict[str, str]]:
    """Start `count` idle containers with agent limits and yield agent id -> container id."""
    run_id = uuid.uuid4().hex[:12]
    image_id = build_busybox_image(client, entrypoint=["/bin/sleep"], cmd=["3600"])
    containers: dict[str, str] = {}
    if settings.runtime == "runsc":
        storage: dict[str, object] = {
            "mounts": [tmpfs_volume(TMP, 8 * MIB), tmpfs_volume(SHM, 8 * MIB)],
            "ulimits": [docker.types.Ulimit(name="nproc", soft=64, hard=64)],
            "pids_limit": settings.runsc_sandbox_pids_limit,
        }
    else:
        storage = {
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={8 * MIB},mode=1777"},
            "pids_limit": 64,
        }
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
                shm_size=8 * MIB,
                runtime=settings.docker_runtime,
                **storage,
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


def cpu_seconds() -> float:
    """Return the CPU time of this process and of its children that have been reaped."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


def cpu_per_round(action: Callable[[], object], rounds: int) -> float:
    """Return the median over REPEATS runs of the CPU seconds per call of `action`."""
    results = []
    for _ in range(REPEATS):
        began = cpu_seconds()
        for _ in range(rounds):
            action()
        results.append((cpu_seconds() - began) / rounds)
    return statistics.median(results)


def runsc_run_cost(settings: SupervisorSettings, container_id: str, runs: int) -> float:
    """Return the median CPU seconds of one `runsc events --stats` run, waited for."""
    tasks = GvisorTasks(runsc=settings.runsc_binary, root=settings.runsc_state_root)
    results = []
    for _ in range(runs):
        began = cpu_seconds()
        tasks.start(container_id)
        while tasks.result(container_id) is None:
            time.sleep(0.002)
        results.append(cpu_seconds() - began)
    return statistics.median(results)


def run(args: argparse.Namespace) -> None:
    """Measure and print the cost of a monitoring round with and without agents."""
    flags = [f"--runtime={args.runtime}"]
    if args.runtime == "runc":
        flags.append("--no-require-gvisor")
    settings = load_settings(SupervisorSettings, flags)
    client = docker.from_env()
    runsc_cost = None
    try:
        with idle_containers(client, args.agents, settings) as containers:
            monitor = ResourceMonitor(settings, mount_sources=DockerAdapter(client).volume_sources)
            monitor_round(monitor, containers)
            if args.runtime == "runsc":
                # Let the first task counts arrive, so every sample carries gVisor's count.
                time.sleep(2)
            samples = monitor.sample_all(containers)
            if len(samples) != len(containers) or any(
                len(sample.disks) != 2 for sample in samples.values()
            ):
                raise RuntimeError("some containers could not be sampled; see the warnings above")
            if args.runtime == "runsc":
                runsc_cost = runsc_run_cost(settings, next(iter(containers.values())), 20)
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
    print(
        f"runtime: {args.runtime}, agents: {args.agents}, rounds: {args.rounds} x {REPEATS} "
        "(median kept)"
    )
    print(f"empty round:          {empty * 1e6:8.1f} us CPU")
    print(f"round with agents:    {full * 1e6:8.1f} us CPU, {wall * 1e3:.2f} ms wall")
    print(f"per agent per round:  {per_agent * 1e6:8.1f} us CPU")
    print(
        f"docker list per round ({args.agents} containers, {listing_rounds} x {REPEATS}): "
        f"{listing * 1e6:8.1f} us CPU in this process, "
        f"{listing / args.agents * 1e6:.1f} us per container"
    )
    if runsc_cost is not None:
        print(f"one runsc events run: {runsc_cost * 1e6:8.1f} us CPU (median of 20)")
        print(
            "per agent per round with 1 run per "
            f"{TASK_REFRESH_ROUNDS + 1} rounds (idle agent): "
            f"{(per_agent + runsc_cost / (TASK_REFRESH_ROUNDS + 1)) * 1e6:8.1f} us CPU; "
            f"with 1 run per round (near its limit): {(per_agent + runsc_cost) * 1e6:8.1f} us"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m bench.monitor`."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
