"""Benchmark: agent-to-proxy throughput and connection rate with and without netguard's ruleset.

Run from the repository root as root, because netguard needs CAP_NET_ADMIN:
`.venv/bin/python -m bench.firewall [--rounds N]`.

One echo agent (busybox) is started through the gateway while netguard runs, because the
supervisor starts no agent without a verified firewall. A TCP sink listens where the proxy
would, on the sandbox gateway address at the proxy's transparent and explicit ports. The
benchmark's netguard gets proxy ports of its own (17001, 17053 and 17080 by default, not the
product's 15001, 15053 and 15080). So the sink never collides with a proxy or a test listener
on the product's ports, and the agent never reaches one. The rules are the same for any port
numbers. Inside the agent, busybox `dd | nc` streams `--megabytes` MB in one connection, and a
shell loop of `nc` opens `--connections` connections one after another, each with a 5-byte
request and a 5-byte response (bench/firewall_traffic.py has the details).

Two paths are measured:

- accept: to the gateway's explicit proxy port, which the ruleset accepts for registered
  agents; the same address and port without netguard.
- redirect: to port 80 of an address outside the sandbox subnet, which the ruleset redirects
  to the transparent port on the gateway. It does not redirect addresses inside the subnet,
  the gateway's included. The address is the gateway of a second Docker network that the
  benchmark creates and removes (`agent-runner-fwb-dst`, no containers), so it belongs to this
  host. A connection that the ruleset did not redirect would be dropped by
  `sandbox-to-host-drop` and would not leave the host. Without netguard nothing redirects port
  80, and the transparent port takes any connection, so the baseline connects to the
  transparent port directly.

The sink checks each connection's original destination (SO_ORIGINAL_DST), and the ruleset's
packet counters must show the traffic, so a run stops if a connection took another path.

"netguard on" is the ruleset loaded with the agent in its set. For "netguard off" netguard is
stopped with SIGTERM, which deletes both of its tables. Starting it again re-applies the
ruleset with the agent from its registry. The agent keeps running throughout. Rounds
alternate the order of the two conditions (on-off, off-on, ...), so netguard restarts once
per round, and both conditions share the machine's noise.

Every connection starts a busybox `nc` process, which costs far more than the ruleset, so the
connection rate measures an agent's whole cost per connection, not the ruleset's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network

import docker
import docker.types
import httpx

from bench.firewall_traffic import AgentShell, Route, Sink, connect_many, stream
from bench.harness import (
    Deadline,
    add_stack_arguments,
    bench_stack,
    echo_image,
    run_main,
    stopping_agents,
    workdir,
)
from services.netguard.nft import FirewallError, Nft
from services.netguard.ruleset import AGENT_SET, counters
from tests.support.stack import Stack

TARGET_LOSS = 0.05
REDIRECTED_PORT = 80
NETGUARD_READY_TIMEOUT = 20.0
METRICS = ("MB/s", "connections/s")


class Condition(StrEnum):
    """Whether netguard's ruleset is loaded while a measurement runs."""

    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class Path:
    """A way from the agent to the proxy's address, under both conditions."""

    name: str
    on: Route
    off: Route

    def route(self, condition: Condition) -> Route:
        """Return the route of `condition`."""
        return self.on if condition == Condition.ON else self.off


def paths(
    *, gateway: IPv4Address, outside: IPv4Address, transparent_port: int, explicit_port: int
) -> tuple[Path, ...]:
    """Return the accept path and the redirect path.

    `outside` is an address of this host outside the sandbox subnet. The redirect path
    connects to its port 80 while netguard runs.
    """
    explicit = Route(host=gateway, port=explicit_port, listener=explicit_port)
    return (
        Path(name=f"accept :{explicit_port}", on=explicit, off=explicit),
        Path(
            name=f"redirect :{REDIRECTED_PORT}",
            on=Route(host=outside, port=REDIRECTED_PORT, listener=transparent_port),
            off=Route(host=gateway, port=transparent_port, listener=transparent_port),
        ),
    )


@dataclass
class Results:
    """Samples per path name, metric and condition, one per round, in round order."""

    samples: dict[tuple[str, str, Condition], list[float]] = field(default_factory=dict)

    def add(self, path: str, metric: str, condition: Condition, value: float) -> None:
        """Record one sample."""
        self.samples.setdefault((path, metric, condition), []).append(value)

    def get(self, path: str, metric: str, condition: Condition) -> list[float]:
        """Return the samples of one series."""
        return self.samples.get((path, metric, condition), [])


class Netguard:
    """Switch the stack's netguard between running (ruleset loaded) and stopped (no tables)."""

    def __init__(self, stack: Stack, agent_address: IPv4Address) -> None:
        self._stack = stack
        self._address = str(agent_address)
        self._nft = Nft()
        self.running = "netguard" in stack.processes

    def start(self) -> None:
        """Start netguard and wait until its set holds the agent's address."""
        self._stack.start_netguard()
        self.running = True
        deadline = time.monotonic() + NETGUARD_READY_TIMEOUT
        while time.monotonic() < deadline:
            # Until netguard has applied its batch, the set does not exist.
            with contextlib.suppress(FirewallError):
                table = self._stack.firewall_table
                if self._address in self._nft.set_elements("inet", table, AGENT_SET):
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"netguard did not put {self._address} in its set within {NETGUARD_READY_TIMEOUT:g} s"
        )

    def stop(self) -> None:
        """Stop netguard with SIGTERM; raises RuntimeError if it fails or leaves a table."""
        status = self._stack.stop_service("netguard")
        self.running = False
        if status != 0:
            raise RuntimeError(f"netguard exited with status {status}")
        left = [
            family
            for family in ("inet", "bridge")
            if self._nft.list_table(family, self._stack.firewall_table) is not None
        ]
        if left:
            raise RuntimeError(f"netguard left its {left} tables after SIGTERM")

    def switch(self, condition: Condition) -> None:
        """Start or stop netguard unless it is in that state already."""
        if condition == Condition.ON and not self.running:
            self.start()
        elif condition == Condition.OFF and self.running:
            self.stop()

    def restore(self) -> None:
        """Start netguard if it is stopped, printing an error instead of raising it.

        A stopping agent unregisters from netguard, which removes its address from Redis.
        """
        if self.running:
            return
        try:
            self.start()
        except RuntimeError as exc:
            print(f"warning: cannot start netguard again: {exc}", file=sys.stderr)

    def counts(self) -> dict[str, int]:
        """Return the packet counters of the inet table's rules."""
        return counters(self._nft.list_table("inet", self._stack.firewall_table) or [])


def check_counters(before: dict[str, int], after: dict[str, int], *, connections: int) -> None:
    """Raise RuntimeError unless the ruleset's accept and redirect rules saw the traffic."""

    def grown(prefix: str) -> int:
        keys = [key for key in after if key.startswith(f"inet/agent-runner:{prefix}")]
        return sum(after[key] - before.get(key, 0) for key in keys)

    # The nat chain evaluates only the first packet of each connection, and each path has
    # `connections` connections plus the stream.
    # Every packet from the agent to a proxy port passes one of the to-proxy accept rules, at
    # least three per connection (SYN, ACK, data) on each of the two paths.
    per_path = connections + 1
    redirected, accepted = grown("redirect-http"), grown("to-proxy-")
    if redirected < per_path or accepted < 2 * 3 * per_path:
        raise RuntimeError(
            f"the ruleset counted {redirected} redirected and {accepted} accepted packets, too "
            f"few for {per_path} connections per path; the traffic did not pass through it"
        )


def measure(
    netguard: Netguard,
    routes: tuple[Path, ...],
    *,
    shell: AgentShell,
    sink: Sink,
    args: argparse.Namespace,
    deadline: Deadline,
) -> Results:
    """Measure `args.rounds` rounds, alternating which condition goes first."""
    steps: dict[str, Callable[[Route], float]] = {
        "MB/s": lambda route: stream(shell, sink, route, megabytes=args.megabytes),
        "connections/s": lambda route: connect_many(shell, sink, route, count=args.connections),
    }
    results = Results()
    for index in range(args.rounds):
        order = [Condition.ON, Condition.OFF]
        if index % 2:
            order.reverse()
        for condition in order:
            netguard.switch(condition)
            before = netguard.counts() if condition == Condition.ON else {}

            for metric in METRICS:
                for path in routes:
                    deadline.check(f"netguard {condition.value}, {path.name}, {metric}")
                    value = steps[metric](path.route(condition))
                    results.add(path.name, metric, condition, value)

            if condition == Condition.ON:
                check_counters(before, netguard.counts(), connections=args.connections)
            print(round_line(results, routes, index, args.rounds, condition), flush=True)
    return results


def round_line(
    results: Results, routes: tuple[Path, ...], index: int, rounds: int, condition: Condition
) -> str:
    """Format the latest samples of one condition."""
    parts = [
        f"{path.name} {results.get(path.name, 'MB/s', condition)[-1]:6.1f} MB/s "
        f"{results.get(path.name, 'connections/s', condition)[-1]:5.0f} conn/s"
        for path in routes
    ]
    return f"round {index + 1:2d}/{rounds} netguard {condition.value:3}: " + " | ".join(parts)


def report(results: Results, routes: tuple[Path, ...], rounds: int) -> None:
    """Print medians, ranges and on/off ratios per path and metric, and the loss.

    The loss is one minus the ratio of the medians. The paired ratio, the median of each
    round's on/off ratio, cancels load that changes between rounds; where the two disagree,
    the difference is noise.
    """
    print()
    print(f"agent to proxy address, {rounds} rounds per condition: median (min-max)")
    print(
        f"{'path':16}{'metric':15}{'netguard on':>22}{'netguard off':>22}{'on/off':>8}{'paired':>8}"
    )
    for metric in METRICS:
        for path in routes:
            on = results.get(path.name, metric, Condition.ON)
            off = results.get(path.name, metric, Condition.OFF)
            ratio = statistics.median(on) / statistics.median(off)
            paired = statistics.median(a / b for a, b in zip(on, off, strict=True))
            verdict = "met" if 1 - ratio <= TARGET_LOSS else "missed"
            print(
                f"{path.name:16}{metric:15}{spread(on):>22}{spread(off):>22}{ratio:8.3f}"
                f"{paired:8.3f}  loss {(1 - ratio) * 100:5.1f} % ({verdict})"
            )
    print(f"target: loss <= {TARGET_LOSS * 100:g} % with netguard's ruleset loaded")


def spread(samples: list[float]) -> str:
    """Format the median and range of samples."""
    return f"{statistics.median(samples):.1f} ({min(samples):.1f}-{max(samples):.1f})"


def sandbox_address(client: docker.DockerClient, container_id: str, network: str) -> IPv4Address:
    """Return the container's address on `network`; raises RuntimeError if it has none."""
    networks = client.containers.get(container_id).attrs["NetworkSettings"]["Networks"]
    address = (networks.get(network) or {}).get("IPAddress")
    if not address:
        raise RuntimeError(f"container {container_id[:12]} has no address on {network!r}")
    return IPv4Address(address)


def foreign_tables(own: str) -> list[str]:
    """Return the nftables tables of the host other than this stack's, as `family name`."""
    output = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return sorted(
        line.removeprefix("table ").strip()
        for line in output.splitlines()
        if line.startswith("table ") and not line.endswith(f" {own}")
    )


@contextlib.contextmanager
def outside_network(
    client: docker.DockerClient, *, name: str, subnet: IPv4Network, bridge: str
) -> Iterator[IPv4Address]:
    """Create a Docker network without containers; yield its gateway address, then remove it.

    Raises RuntimeError when a network of that name exists already.
    """
    if any(network.name == name for network in client.networks.list()):
        raise RuntimeError(
            f"Docker network {name!r} exists already; another benchmark may be using it. Pass "
            "--outside-network, --outside-subnet and --outside-bridge to pick another one"
        )
    network = client.networks.create(
        name,
        driver="bridge",
        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(subnet))]),
        options={"com.docker.network.bridge.name": bridge},
    )
    try:
        network.reload()
        gateway = network.attrs["IPAM"]["Config"][0].get("Gateway") or next(subnet.hosts())
        yield IPv4Address(gateway)
    finally:
        network.remove()


@contextlib.contextmanager
def running_sink(gateway: IPv4Address, ports: list[int]) -> Iterator[Sink]:
    """Yield a sink on the gateway's proxy ports and close it however the block ends."""
    sink = Sink(gateway, ports)
    try:
        yield sink
    finally:
        sink.close()


def run(args: argparse.Namespace) -> None:
    """Set everything up, measure, report and clean up."""
    deadline = Deadline(args.max_seconds)
    subnet = IPv4Network(args.sandbox_subnet)
    gateway = next(subnet.hosts())
    netguard_args = [
        f"--proxy-transparent-port={args.transparent_port}",
        f"--proxy-explicit-port={args.explicit_port}",
        f"--proxy-dns-port={args.dns_port}",
    ]
    with contextlib.ExitStack() as resources:
        folder = resources.enter_context(workdir())
        client = docker.from_env(timeout=120)
        resources.callback(client.close)
        image = resources.enter_context(echo_image(client, folder))
        stack = resources.enter_context(
            bench_stack(client, folder, args, image_url=image.url, netguard_args=netguard_args)
        )
        # The supervisor has created the sandbox network, so the gateway address exists.
        sink = resources.enter_context(
            running_sink(gateway, [args.transparent_port, args.explicit_port])
        )
        outside = resources.enter_context(
            outside_network(
                client,
                name=args.outside_network,
                subnet=IPv4Network(args.outside_subnet),
                bridge=args.outside_bridge,
            )
        )
        api = resources.enter_context(
            httpx.Client(base_url=stack.api_url, headers=stack.headers, trust_env=False)
        )
        agents = resources.enter_context(stopping_agents(api, image))

        agent, _ = agents.start()
        address = sandbox_address(client, agent["container_id"], args.sandbox_network)
        if address not in subnet:
            raise RuntimeError(f"agent address {address} is outside {subnet}")
        netguard = Netguard(stack, address)
        resources.callback(netguard.restore)
        shell = AgentShell(agent["container_id"])
        routes = paths(
            gateway=gateway,
            outside=outside,
            transparent_port=args.transparent_port,
            explicit_port=args.explicit_port,
        )
        others = foreign_tables(stack.firewall_table)
        print(
            f"agent {agent['agent_id']} at {address}, sink on {gateway} ports "
            f"{args.transparent_port} and {args.explicit_port}, redirect path to {outside}:80, "
            f"table {stack.firewall_table}; {len(others)} other nftables tables on the host",
            flush=True,
        )

        # A short stream and 50 connections on each path check the setup before measuring.
        for path in routes:
            stream(shell, sink, path.on, megabytes=10)
            connect_many(shell, sink, path.on, count=50)
        print("warm-up done: both paths reach the sink through the ruleset", flush=True)
        results = measure(netguard, routes, shell=shell, sink=sink, args=args, deadline=deadline)
        report(results, routes, args.rounds)

        after = foreign_tables(stack.firewall_table)
        if after != others:
            print(f"note: the other nftables tables changed during the run: {others} -> {after}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; raises SystemExit on invalid options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.firewall",
        description="Measure agent-to-proxy throughput and connection rate with netguard's "
        "ruleset loaded and with netguard stopped.",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="Measurements of each condition, alternating, 1 to 100 (default: %(default)s).",
    )
    parser.add_argument(
        "--megabytes",
        type=int,
        default=200,
        help="MB (10^6 bytes) per stream, 1 to 10000 (default: %(default)s).",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=2000,
        help="Sequential connections per measurement, 1 to 100000 (default: %(default)s).",
    )
    parser.add_argument(
        "--transparent-port",
        type=int,
        default=17001,
        help="Netguard's proxy transparent port, where it redirects agents' TCP 80 and 443. The "
        "sink listens on it on the gateway address, so no other program may "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--explicit-port",
        type=int,
        default=17080,
        help="Netguard's explicit proxy port, which agents may connect to directly. The sink "
        "listens on it on the gateway address, so no other program may (default: %(default)s).",
    )
    parser.add_argument(
        "--dns-port",
        type=int,
        default=17053,
        help="Netguard's proxy DNS port; not measured, but it must differ from the other two "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--outside-network",
        default="agent-runner-fwb-dst",
        help="Docker network without containers that the benchmark creates and removes; the "
        "redirect path connects to port 80 of its gateway address (default: %(default)s).",
    )
    parser.add_argument(
        "--outside-subnet",
        default="172.29.6.0/24",
        help="Private subnet of that network, outside --sandbox-subnet; it must not overlap "
        "another network (default: %(default)s).",
    )
    parser.add_argument(
        "--outside-bridge",
        default="ar-fwb1",
        help="Linux bridge name of that network, at most 15 characters (default: %(default)s).",
    )
    add_stack_arguments(parser, max_seconds=1200.0)
    # Distinct from the other benchmarks' and the integration tests' networks.
    parser.set_defaults(
        sandbox_network="agent-runner-fwb", sandbox_subnet="172.29.7.0/24", sandbox_bridge="ar-fwb0"
    )
    args = parser.parse_args(argv)

    for name, low, high in (
        ("rounds", 1, 100),
        ("megabytes", 1, 10_000),
        ("connections", 1, 100_000),
        ("transparent_port", 1024, 65535),
        ("explicit_port", 1024, 65535),
        ("dns_port", 1024, 65535),
    ):
        value = getattr(args, name)
        if not low <= value <= high:
            parser.error(f"--{name.replace('_', '-')} must be {low} to {high}, got {value}")
    if len({args.transparent_port, args.explicit_port, args.dns_port}) != 3:
        parser.error("--transparent-port, --explicit-port and --dns-port must be different")
    outside, sandbox = IPv4Network(args.outside_subnet), IPv4Network(args.sandbox_subnet)
    if not outside.is_private or outside.overlaps(sandbox):
        parser.error(
            f"--outside-subnet {outside} must be private and outside --sandbox-subnet {sandbox}"
        )
    if os.geteuid() != 0:
        parser.error("run as root: netguard needs CAP_NET_ADMIN to load its tables")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, or 130 after Ctrl-C or SIGTERM."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
