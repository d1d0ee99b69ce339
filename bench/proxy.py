"""Benchmark: an allowed HTTP GET sent directly, through our proxy and through Squid.

Run from the repository root as root, because it creates network namespaces and nftables
rules: `.venv/bin/python -m bench.proxy [--rounds N --requests N]`.

Everything runs on this machine in three network namespaces that the benchmark creates and
removes (bench/proxy_net.py has the addresses). The upstream namespace contains a fake HTTP
server at 198.51.100.80:80, which returns a small body for every GET, and a fake DNS server
at 203.0.113.80, which resolves `allowed.test` and its subdomains. The client namespace
contains the load client at 203.0.113.98. The benchmark registers that address in Redis as an agent
whose allowlist is `allowed.test, *.allowed.test`, with AgentRegistry.put, as netguard does
for a real agent. The proxy namespace routes between the two and runs, as separate users:

- our proxy (`agent-runner-proxy`), whose explicit mode listens on the sandbox gateway
  203.0.113.97:15080 and resolves names through the fake DNS server, with its own Redis and
  nats-server (JetStream) on that namespace's loopback;
- Squid from Debian's package, on 203.0.113.97:3128, with the same allowlist
  (`acl allowed dstdomain .allowed.test`, ports 80 and 443, deny everything else) and the
  fake DNS server as `dns_nameservers`.

An nftables table in the proxy namespace drops whatever either proxy's user sends anywhere
but loopback, the client's subnet and the two fake hosts, and the run fails if it dropped a
packet.

Paths (the same client, concurrency, upstream and request count for each):

- direct: `GET /` to 198.51.100.80:80, routed through the proxy namespace;
- proxy: `GET http://www.allowed.test/` to our proxy's explicit port;
- squid: the same request to Squid.

The load client opens a new TCP connection per request (`Connection: close`), as an agent's
typical call does, from a fixed number of concurrent workers. Each round runs the three paths
once, each after a warm-up, and the order rotates from round to round. Before the rounds,
each proxy must return 403 for a name outside the allowlist. Besides the rate and latency,
the CPU time that each process used during a path's run is divided by its request count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as redis

from bench.harness import Deadline, interrupts_raise, percentile
from bench.proxy_net import (
    CLIENT,
    DNS_SERVER,
    GATEWAY,
    ROUTER,
    SANDBOX_SUBNET,
    UPSTREAM,
    Confinement,
    Network,
    bench_network,
    confined,
    leftover_namespaces,
)
from bench.proxy_profile import profile_proxy
from bench.proxy_services import (
    EXPLICIT_PORT,
    REDIS_PORT,
    SQUID_PORT,
    Backends,
    Service,
    access_log_count,
    cpu_seconds,
    ensure_squid,
    running,
    running_backends,
    running_our_proxy,
    running_squid,
    wait_for_text,
)
from bench.proxy_traffic import LoadResult
from libs.common.messages import AgentNetworkPolicy
from libs.common.registry import AgentRegistry
from tests.support.stack import REPO_ROOT

TARGET_THROUGHPUT_RATIO = 0.5
TARGET_P99_RATIO = 1.0
# Users of the two proxies in the proxy namespace; no account with these ids needs to exist.
PROXY_UID = 64_331
SQUID_UID = 64_332
ALLOWED_HOST = "www.allowed.test"
DENIED_HOST = "www.denied.test"
PATHS = ("direct", "proxy", "squid")


@dataclass(frozen=True, kw_only=True)
class Route:
    """One path: the load client's destination and request, and the processes besides the
    client that the path keeps busy."""

    name: str
    host: str
    port: int
    target: str
    upstream_peer: str
    processes: tuple[str, ...]

    def load_command(self, network: Network, args: argparse.Namespace) -> list[str]:
        """Return the command that runs the load client in the client namespace."""
        return [
            *network.exec_prefix(network.client),
            sys.executable,
            "-m",
            "bench.proxy_traffic",
            "load",
            f"--host={self.host}",
            f"--port={self.port}",
            f"--target={self.target}",
            f"--host-header={ALLOWED_HOST}",
            f"--concurrency={args.concurrency}",
            f"--timeout={args.request_timeout}",
        ]


PROXY_URL = f"http://{ALLOWED_HOST}/"
ROUTES = {
    "direct": Route(
        name="direct",
        host=str(UPSTREAM),
        port=80,
        target="/",
        upstream_peer=str(CLIENT),
        processes=("upstream",),
    ),
    "proxy": Route(
        name="proxy",
        host=str(GATEWAY),
        port=EXPLICIT_PORT,
        target=PROXY_URL,
        upstream_peer=str(ROUTER),
        processes=("proxy", "redis", "nats", "upstream"),
    ),
    "squid": Route(
        name="squid",
        host=str(GATEWAY),
        port=SQUID_PORT,
        target=PROXY_URL,
        upstream_peer=str(ROUTER),
        processes=("squid", "upstream"),
    ),
}


@dataclass(frozen=True)
class Sample:
    """One path's result in one round.

    Rate in requests per second, latency quantiles in seconds, and CPU time per request in
    seconds for the client and each other process of the path.
    """

    throughput: float
    p50: float
    p99: float
    cpu: dict[str, float]


@dataclass(frozen=True)
class Setup:
    """Namespaces, folder, confinement and processes of one run, removed when it ends."""

    network: Network
    folder: Path
    confinement: Confinement
    processes: dict[str, Service]


def run_load(
    command: list[str], *, route: Route, deadline: Deadline, seconds: float, peer: str
) -> LoadResult:
    """Run the load client and return its result.

    Raises RuntimeError when a request failed or the upstream saw another client than
    `peer` (empty for responses that never reached it), so that no failed or misrouted
    request counts as a fast one.
    """
    deadline.check(f"{route.name} path")
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=REPO_ROOT, timeout=seconds
    )
    if result.returncode != 0:
        raise RuntimeError(f"load client for {route.name} failed: {result.stderr[-3000:]}")
    measured = LoadResult(**json.loads(result.stdout))
    if measured.failures:
        raise RuntimeError(f"{route.name}: requests failed: {measured.failures}")
    if set(measured.peers) != {peer}:
        raise RuntimeError(
            f"{route.name}: the upstream saw clients {measured.peers}, expected {peer!r}"
        )
    return measured


def measure(setup: Setup, route: Route, args: argparse.Namespace, deadline: Deadline) -> Sample:
    """Send the warm-up and the measured requests along `route` and summarise them."""
    command = [
        *route.load_command(setup.network, args),
        f"--requests={args.requests}",
        f"--warmup={args.warmup}",
    ]
    pids = {name: setup.processes[name].process.pid for name in route.processes}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    measured = run_load(
        command,
        route=route,
        deadline=deadline,
        seconds=args.path_timeout,
        peer=route.upstream_peer,
    )
    # The client counts its CPU time during the measured requests only, while the other
    # processes' counts include the warm-up.
    sent = args.requests + args.warmup
    cpu = {"client": measured.cpu / args.requests}
    cpu.update({name: (cpu_seconds(pid) - before[name]) / sent for name, pid in pids.items()})
    return Sample(
        throughput=len(measured.latencies) / measured.elapsed,
        p50=percentile(measured.latencies, 0.50),
        p99=percentile(measured.latencies, 0.99),
        cpu=cpu,
    )


def check_denied(setup: Setup, args: argparse.Namespace, deadline: Deadline) -> None:
    """Require 403 from both proxies for a name outside the allowlist."""
    for name in ("proxy", "squid"):
        route = ROUTES[name]
        command = [
            *route.load_command(setup.network, args),
            f"--target=http://{DENIED_HOST}/",
            f"--host-header={DENIED_HOST}",
            "--requests=1",
            "--expect-status=403",
        ]
        run_load(command, route=route, deadline=deadline, seconds=args.path_timeout, peer="")


def check_logs(setup: Setup, sent: int) -> None:
    """Raise RuntimeError unless each proxy logged `sent` allowed requests and the
    confinement dropped nothing, which shows that every request took its path."""
    logged = 0
    for line in (setup.folder / "proxy.log").read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            message = str(json.loads(line).get("message", ""))
            if message.startswith("proxy.request allow") and "status=200" in message:
                logged += 1
    squid_logged = access_log_count(setup.folder, "TCP_MISS/200")
    if logged != sent or squid_logged != sent:
        raise RuntimeError(
            f"sent {sent} allowed requests to each proxy, but our proxy logged {logged} "
            f"and Squid {squid_logged}"
        )
    dropped = setup.confinement.dropped_packets()
    if dropped:
        raise RuntimeError(f"the confinement table dropped {dropped} packets of a proxy")
    print(f"checked: each proxy logged all {sent} requests; the confinement dropped nothing")


async def register_agent(backends: Backends, host_id: str) -> None:
    """Store the client's address and allowlist as an agent policy, as netguard does."""
    client = redis.Redis(
        host="127.0.0.1", port=REDIS_PORT, password=backends.redis_password, decode_responses=True
    )
    try:
        policy = AgentNetworkPolicy(
            agent_id=f"ag-{secrets.token_hex(16)}",
            address=str(CLIENT),
            allowed_domains=["allowed.test", "*.allowed.test"],
        )
        await AgentRegistry(client, host_id=host_id).put(policy)
    finally:
        await client.aclose()


@contextlib.contextmanager
def fake_upstream(network: Network, folder: Path, args: argparse.Namespace) -> Iterator[Service]:
    """Run the fake HTTP and DNS server in the upstream namespace until the block ends."""
    command = [
        *network.exec_prefix(network.upstream),
        sys.executable,
        "-m",
        "bench.proxy_traffic",
        "serve",
        f"--http-address={UPSTREAM}",
        f"--dns-address={DNS_SERVER}",
        "--zone=allowed.test",
        f"--record-address={UPSTREAM}",
        f"--body-bytes={args.body_bytes}",
        f"--delay-ms={args.upstream_delay_ms}",
    ]
    with running("fake upstream", command, log=folder / "upstream.log") as server:
        # `serve` prints "ready" once its sockets are bound.
        wait_for_text(server, "ready")
        yield server


@contextlib.contextmanager
def bench_setup(args: argparse.Namespace) -> Iterator[Setup]:
    """Create the namespaces and start every process; remove all of it on exit."""
    run_id = secrets.token_hex(4)
    host_id = f"bench-{run_id}"
    with contextlib.ExitStack() as resources:
        folder = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="arpb-")))
        # The proxies' users must reach their own folders inside this one.
        folder.chmod(0o711)
        network = resources.enter_context(bench_network(run_id))
        allowed = ("127.0.0.0/8", str(SANDBOX_SUBNET), str(UPSTREAM), str(DNS_SERVER))
        confinement = resources.enter_context(
            confined(f"arpb_{run_id}", uids=(PROXY_UID, SQUID_UID), allowed=allowed)
        )
        upstream = resources.enter_context(fake_upstream(network, folder, args))
        backends = resources.enter_context(running_backends(folder))
        asyncio.run(register_agent(backends, host_id))
        proxy = resources.enter_context(
            running_our_proxy(
                folder,
                backends,
                host_id=host_id,
                uid=PROXY_UID,
                dns_server=DNS_SERVER,
                subnet=SANDBOX_SUBNET,
                gateway=GATEWAY,
            )
        )
        squid = resources.enter_context(
            running_squid(folder, uid=SQUID_UID, gateway=GATEWAY, dns_server=DNS_SERVER)
        )
        processes = {
            "upstream": upstream,
            "redis": backends.redis,
            "nats": backends.nats,
            "proxy": proxy,
            "squid": squid,
        }
        yield Setup(network=network, folder=folder, confinement=confinement, processes=processes)


def ms(seconds: float) -> str:
    """Format seconds as milliseconds with two decimals."""
    return f"{seconds * 1000:.2f}"


def round_line(index: int, samples: dict[str, Sample]) -> str:
    """Describe one round's results in one line."""
    parts = [
        f"{name} {sample.throughput:.0f} req/s p50 {ms(sample.p50)} p99 {ms(sample.p99)} ms"
        for name, sample in samples.items()
    ]
    return f"round {index}: " + "; ".join(parts)


def report(samples: dict[str, list[Sample]], args: argparse.Namespace) -> None:
    """Print the medians per path, the CPU time per request, and the ratios to the targets."""
    print(
        f"\nmedians of {args.rounds} rounds, {args.requests} requests each, "
        f"concurrency {args.concurrency}:"
    )
    print(f"{'path':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}   req/s range")
    medians = {}
    for name in PATHS:
        rows = samples[name]
        medians[name] = Sample(
            throughput=statistics.median(row.throughput for row in rows),
            p50=statistics.median(row.p50 for row in rows),
            p99=statistics.median(row.p99 for row in rows),
            cpu={key: statistics.median(row.cpu[key] for row in rows) for key in rows[0].cpu},
        )
        low = min(row.throughput for row in rows)
        high = max(row.throughput for row in rows)
        median = medians[name]
        print(
            f"{name:<8} {median.throughput:8.0f} {ms(median.p50):>8} {ms(median.p99):>8}"
            f"   {low:.0f}-{high:.0f}"
        )
    print("CPU time per request, medians (ms):")
    for name in PATHS:
        shares = ", ".join(f"{key} {ms(value)}" for key, value in medians[name].cpu.items())
        print(f"  {name:<8} {shares}")

    throughput_ratio = medians["proxy"].throughput / medians["direct"].throughput
    squid_ratio = medians["squid"].throughput / medians["direct"].throughput
    met = "met" if throughput_ratio >= TARGET_THROUGHPUT_RATIO else "missed"
    print(
        f"proxy/direct throughput: {throughput_ratio:.3f} "
        f"(target >= {TARGET_THROUGHPUT_RATIO}: {met}); squid/direct: {squid_ratio:.3f}"
    )
    p99_ratio = medians["proxy"].p99 / medians["squid"].p99
    met = "met" if p99_ratio <= TARGET_P99_RATIO else "missed"
    print(f"proxy p99 / squid p99: {p99_ratio:.1f} (target <= {TARGET_P99_RATIO}: {met})")


def run(args: argparse.Namespace) -> None:
    """Set everything up, run the rounds, check the logs and print the report."""
    deadline = Deadline(args.max_seconds)
    leftovers = leftover_namespaces()
    if leftovers:
        print(
            f"warning: namespaces {leftovers} of an earlier run exist; if no run is active, "
            "remove them with: ip netns delete NAME",
            file=sys.stderr,
        )
    squid_version = ensure_squid()
    load = os.getloadavg()
    with bench_setup(args) as setup:
        proxy_pid = setup.processes["proxy"].process.pid
        print(f"{squid_version}; our proxy's pid {proxy_pid}; load average {load[0]:.2f}")
        check_denied(setup, args, deadline)

        samples: dict[str, list[Sample]] = {name: [] for name in PATHS}
        for index in range(args.rounds):
            shift = index % len(PATHS)
            results = {}
            for name in PATHS[shift:] + PATHS[:shift]:
                results[name] = measure(setup, ROUTES[name], args, deadline)
                samples[name].append(results[name])
            print(round_line(index + 1, results), flush=True)

        check_logs(setup, args.rounds * (args.requests + args.warmup))
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        report(samples, args)

        if args.py_spy is not None:
            deadline.check("profile")
            route = ROUTES["proxy"]
            command = [*route.load_command(setup.network, args), f"--requests={args.requests}"]
            profile_proxy(
                args.py_spy,
                pid=proxy_pid,
                output=setup.folder / "profile.txt",
                load=lambda: run_load(
                    command,
                    route=route,
                    deadline=deadline,
                    seconds=args.path_timeout,
                    peer=route.upstream_peer,
                ),
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the benchmark's options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy",
        description="Compare an allowed HTTP GET sent directly, through our proxy and through "
        "Squid. Needs root.",
    )

    parser.add_argument("--rounds", type=int, default=5, help="Rounds of all three paths.")
    parser.add_argument(
        "--requests", type=int, default=3000, help="Measured requests per path and round."
    )
    parser.add_argument(
        "--warmup", type=int, default=200, help="Unmeasured requests before each measurement."
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="Requests in flight at once (workers)."
    )

    parser.add_argument(
        "--body-bytes", type=int, default=256, help="Size of the upstream's response body."
    )
    parser.add_argument(
        "--upstream-delay-ms",
        type=float,
        default=0.0,
        help="Milliseconds the upstream waits before each response, standing for the round "
        "trip to a server on the internet (0: a local server).",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=10.0, help="Seconds one request may take."
    )
    parser.add_argument(
        "--path-timeout",
        type=float,
        default=90.0,
        help="Seconds one path's warm-up and measurement may take together.",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="Stop with an error when the run, setup included, takes longer than this.",
    )

    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        help="Path of a py-spy binary. If given, one more unmeasured run of the proxy path "
        "follows while py-spy samples our proxy, and the busiest code is printed.",
    )

    args = parser.parse_args(argv)
    for option in ("rounds", "requests", "concurrency", "body_bytes"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, or 130 after Ctrl-C or SIGTERM."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.proxy needs root for namespaces and nftables", file=sys.stderr)
        return 2
    try:
        with interrupts_raise():
            run(args)
    except KeyboardInterrupt:
        print("interrupted; cleanup finished", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
