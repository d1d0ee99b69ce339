"""Network namespaces and outbound confinement of the proxy benchmark.

Three namespaces are created per run, joined by two veth pairs, and nothing in the host's own
namespace changes: no address, route or nftables table. So the benchmark cannot clash with
tests/support/fakenet.py, whose fixed addresses live in the host namespace, and no packet of
the benchmark has a way off this machine.

    client namespace          proxy namespace               upstream namespace
    203.0.113.98/28  --veth-- 203.0.113.97 (gateway)
                              198.51.100.81/32     --veth-- 198.51.100.80 (HTTP :80)
                                                            203.0.113.80  (DNS :53)

The proxy namespace routes between the other two (IPv4 forwarding is on there only), so the
direct path crosses the same veths as the proxied ones. The benchmark process enters the
proxy namespace after creating them, so the proxy, Squid, Redis and NATS that it starts run
there and bind that namespace's own loopback. The load client and the fake upstream run in
theirs through `ip netns exec`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

SANDBOX_SUBNET = IPv4Network("203.0.113.96/28")
GATEWAY = IPv4Address("203.0.113.97")
CLIENT = IPv4Address("203.0.113.98")
# The proxy namespace's own address on the upstream link: the source of both proxies'
# upstream connections, and the peer address the fake upstream reports for them.
ROUTER = IPv4Address("198.51.100.81")
UPSTREAM = IPv4Address("198.51.100.80")
DNS_SERVER = IPv4Address("203.0.113.80")
# Namespace names start with this, followed by a random run id.
NAME_PREFIX = "arpb-"
COMMAND_TIMEOUT = 30
_CLONE_NEWNET = 0x40000000


class NetworkError(RuntimeError):
    """A namespace, link or nftables step failed."""


def run(*command: str) -> str:
    """Run `command` and return its output; raise NetworkError with its stderr on failure."""
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT
    )
    if result.returncode != 0:
        raise NetworkError(
            f"{' '.join(command)} failed with status {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


@dataclass(frozen=True)
class Network:
    """The names of one run's namespaces."""

    run_id: str

    @property
    def proxy(self) -> str:
        """Namespace of the proxies, Redis, NATS and the benchmark process itself."""
        return f"{NAME_PREFIX}{self.run_id}-p"

    @property
    def client(self) -> str:
        """Namespace of the load client, whose address is registered as an agent."""
        return f"{NAME_PREFIX}{self.run_id}-c"

    @property
    def upstream(self) -> str:
        """Namespace of the fake upstream HTTP server and the fake DNS server."""
        return f"{NAME_PREFIX}{self.run_id}-u"

    def exec_prefix(self, namespace: str) -> list[str]:
        """Return the command prefix that runs a program in `namespace`.

        `ip netns exec` execs the program, so the pid of the started process is its own.
        """
        return ["ip", "netns", "exec", namespace]


def leftover_namespaces() -> list[str]:
    """Return namespaces of earlier runs that were not removed, e.g. after SIGKILL."""
    output = run("ip", "-j", "netns", "list").strip()
    names = [entry["name"] for entry in json.loads(output)] if output else []
    return [name for name in names if name.startswith(NAME_PREFIX)]


def _enter_namespace(name: str) -> None:
    # os.setns exists from Python 3.12 on only. Called before this process starts any
    # thread, so every later thread and child process inherits the namespace.
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise NetworkError(f"cannot enter namespace {name!r}: {os.strerror(error)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def bench_network(run_id: str) -> Iterator[Network]:
    """Create the three namespaces and their links, enter the proxy namespace, yield.

    Everything is removed on exit. The benchmark process stays in the proxy namespace, which
    the kernel frees when the process ends.
    """
    network = Network(run_id)
    proxy, client, upstream = network.proxy, network.client, network.upstream
    to_client, from_client = f"arpb{run_id}pc", f"arpb{run_id}cp"
    to_upstream, from_upstream = f"arpb{run_id}pu", f"arpb{run_id}up"
    with contextlib.ExitStack() as cleanup:
        for name in (proxy, client, upstream):
            run("ip", "netns", "add", name)
            cleanup.callback(_delete_namespace, name)
        # Deleting a namespace deletes the veth ends in it, and with them their peers.
        _add_veth(proxy, to_client, client, from_client)
        _add_veth(proxy, to_upstream, upstream, from_upstream)
        for name in (proxy, client, upstream):
            run("ip", "-n", name, "link", "set", "lo", "up")

        prefix = SANDBOX_SUBNET.prefixlen
        run("ip", "-n", proxy, "addr", "add", f"{GATEWAY}/{prefix}", "dev", to_client)
        run("ip", "-n", proxy, "addr", "add", f"{ROUTER}/32", "dev", to_upstream)
        run("ip", "-n", proxy, "link", "set", to_client, "up")
        run("ip", "-n", proxy, "link", "set", to_upstream, "up")
        for address in (UPSTREAM, DNS_SERVER):
            run("ip", "-n", proxy, "route", "add", f"{address}/32", "dev", to_upstream)
        run("ip", "netns", "exec", proxy, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # Every request opens a new connection, and each one closed leaves a TIME_WAIT socket
        # for 60 s. Reusing those for new outgoing connections keeps long runs from running out
        # of source ports towards the one upstream address.
        for name in (proxy, client):
            run("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")

        run("ip", "-n", client, "addr", "add", f"{CLIENT}/{prefix}", "dev", from_client)
        run("ip", "-n", client, "link", "set", from_client, "up")
        run("ip", "-n", client, "route", "add", "default", "via", str(GATEWAY))

        for address in (UPSTREAM, DNS_SERVER):
            run("ip", "-n", upstream, "addr", "add", f"{address}/32", "dev", from_upstream)
        run("ip", "-n", upstream, "link", "set", from_upstream, "up")
        run("ip", "-n", upstream, "route", "add", f"{ROUTER}/32", "dev", from_upstream)
        run("ip", "-n", upstream, "route", "add", "default", "via", str(ROUTER))

        _check_isolated(network)
        _enter_namespace(proxy)
        yield network


def _add_veth(namespace: str, name: str, peer_namespace: str, peer: str) -> None:
    command = ["ip", "-n", namespace, "link", "add", name, "type", "veth"]
    run(*command, "peer", "name", peer, "netns", peer_namespace)


def _delete_namespace(name: str) -> None:
    with contextlib.suppress(NetworkError):
        run("ip", "netns", "delete", name)


def _check_isolated(network: Network) -> None:
    """Raise NetworkError unless each namespace has only loopback and its own veths."""
    for name in (network.proxy, network.client, network.upstream):
        links = json.loads(run("ip", "-n", name, "-j", "link", "show"))
        foreign = [
            link["ifname"]
            for link in links
            if link["ifname"] != "lo" and not link["ifname"].startswith(f"arpb{network.run_id}")
        ]
        if foreign:
            raise NetworkError(f"namespace {name!r} has unexpected interfaces {foreign}")


# Outbound confinement


@dataclass(frozen=True)
class Confinement:
    """An nftables table in the current namespace that drops the listed users' stray packets."""

    table: str

    def dropped_packets(self) -> int:
        """Return how many packets the drop rules have dropped so far."""
        ruleset = json.loads(run("nft", "-j", "list", "table", "inet", self.table))
        total = 0
        for item in ruleset["nftables"]:
            rule = item.get("rule")
            if rule is None:
                continue
            expressions = rule["expr"]
            if any("drop" in expression for expression in expressions):
                total += sum(
                    int(expression["counter"]["packets"])
                    for expression in expressions
                    if "counter" in expression
                )
        return total


@contextlib.contextmanager
def confined(
    table: str, *, uids: tuple[int, ...], allowed: tuple[str, ...]
) -> Iterator[Confinement]:
    """Drop every packet that `uids` send to an IPv4 address outside `allowed` or to an IPv6
    address other than ::1, as tests/support/stack.py's `confine_proxy` does.

    The table is deleted when the block ends.
    """
    users = ", ".join(str(uid) for uid in uids)
    ruleset = (
        f"table inet {table} {{\n"
        "  chain output {\n"
        "    type filter hook output priority -20; policy accept;\n"
        f"    meta skuid {{ {users} }} meta nfproto ipv4 ip daddr != {{ {', '.join(allowed)} }}"
        " counter drop\n"
        f"    meta skuid {{ {users} }} meta nfproto ipv6 ip6 daddr != ::1 counter drop\n"
        "  }\n"
        "}\n"
    )
    result = subprocess.run(
        ["nft", "-f", "-"], input=ruleset, text=True, capture_output=True, check=False
    )
    if result.returncode != 0:
        raise NetworkError(f"cannot load table {table!r}: {result.stderr.strip()}")
    try:
        yield Confinement(table)
    finally:
        with contextlib.suppress(NetworkError):
            run("nft", "delete", "table", "inet", table)
