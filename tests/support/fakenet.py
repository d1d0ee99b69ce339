"""A fake internet host and a fake proxy for the firewall tests, built from namespaces and veths.

The firewall tests must prove where an agent's packets go without sending any of them off this
machine. `fake_internet()` creates a network namespace joined to the host by a veth pair and
puts documentation addresses (RFC 5737, RFC 3849) and one link-local test address on its end,
with host routes that send those addresses into the veth. A listener process inside the
namespace logs every connection and datagram it receives and answers DNS queries for `*.test`.
`fake_proxy()` and `host_listeners()` run the same listener script in the host namespace, so a
test can see what a redirect delivered and to which original destination.

Every context manager removes what it created (listener processes by pid, the veth pair, the
namespace) even when the test fails. Only one fake internet can exist on a host at a time,
because its addresses are fixed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LISTENER_SCRIPT = Path(__file__).with_name("fakenet_listeners.py")

# Host end and fake-host end of the veth pair.
HOST_ADDRESS = "198.51.100.1"
FAKE_HOST = "198.51.100.10"
SECOND_HOST_ADDRESS = "203.0.113.1"
SECOND_FAKE_HOST = "203.0.113.10"
# Routed to the fake host by a /32 host route only, so that no other link-local address
# (the cloud metadata address among them) changes its route.
LINK_LOCAL_FAKE_HOST = "169.254.42.42"
HOST_ADDRESS_V6 = "2001:db8:100::1"
FAKE_HOST_V6 = "2001:db8:100::10"
FAKE_NETWORKS = (
    ipaddress.ip_network("198.51.100.0/24"),
    ipaddress.ip_network("203.0.113.0/24"),
    ipaddress.ip_network("2001:db8:100::/64"),
    ipaddress.ip_network(f"{LINK_LOCAL_FAKE_HOST}/32"),
)

FAKE_HOST_TCP_PORTS = (22, 53, 80, 443, 853, 5353)
FAKE_HOST_UDP_PORTS = (53, 443, 9999)
# Address that the fake resolver on the fake host returns for any *.test name.
FAKE_RESOLVER_ANSWER = FAKE_HOST

# Address that the fake proxy's DNS port returns for any *.test name. It differs from the fake
# resolver's, so a client's output shows which server replied.
FAKE_PROXY_DNS_ANSWER = "203.0.113.53"
PROXY_TRANSPARENT_PORT = 15001
PROXY_EXPLICIT_PORT = 15080
PROXY_DNS_PORT = 15053

LISTENER_START_SECONDS = 10.0
COMMAND_TIMEOUT_SECONDS = 30


class FakeNetError(RuntimeError):
    """The fake network could not be created as specified."""


@dataclass(frozen=True)
class Hit:
    """One connection or datagram that a listener received."""

    role: str
    protocol: str
    local: str | None
    port: int
    peer: str
    peer_port: int
    original_dst: str | None
    data: str
    dns_name: str | None


class ListenerProcess:
    """A running fakenet_listeners.py and its log of hits."""

    def __init__(self, command: list[str], *, log: Path, role: str) -> None:
        self.log = log
        self.role = role
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        stderr_path = log.with_suffix(".stderr")
        with stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        self._stderr_path = stderr_path

    @property
    def pid(self) -> int:
        """Process id of the listener."""
        return self.process.pid

    def wait_ready(self, *, timeout: float = LISTENER_START_SECONDS) -> None:
        """Wait until the listener bound every socket; raise FakeNetError if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FakeNetError(
                    f"listener {self.role!r} exited with status {self.process.returncode}: "
                    f"{self._stderr_path.read_text(errors='replace')[-2000:]}"
                )
            if any(record.get("event") == "ready" for record in self._records()):
                return
            time.sleep(0.05)
        raise FakeNetError(f"listener {self.role!r} was not ready within {timeout:g} s")

    def hits(self, since: int = 0) -> list[Hit]:
        """Return the hits logged so far, skipping the first `since` of them."""
        hits = [
            Hit(
                role=record["role"],
                protocol=record["event"],
                local=record["local"],
                port=record["port"],
                peer=record["peer"],
                peer_port=record["peer_port"],
                original_dst=record["original_dst"],
                data=record["data"],
                dns_name=record["dns_name"],
            )
            for record in self._records()
            if record.get("event") in ("tcp", "udp")
        ]
        return hits[since:]

    def mark(self) -> int:
        """Return the number of hits so far, to pass to hits(since=...) later."""
        return len(self.hits())

    def stop(self) -> None:
        """End the listener by its pid: SIGTERM, then SIGKILL after 5 s."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def _records(self) -> list[dict[str, Any]]:
        # The last line may still be half written; only whole lines count.
        text = self.log.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


# Exits 0 when a TCP connection to argv[1]:argv[2] opens within 2 s, else prints why and exits 1.
CONNECT_SCRIPT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError as exc:
    print(repr(exc))
    sys.exit(1)
"""


@dataclass(frozen=True)
class FakeInternet:
    """A fake internet host in its own network namespace, reachable through a veth pair."""

    namespace: str
    host_interface: str
    peer_interface: str
    listener: ListenerProcess

    def route_loopback_to_host(self) -> None:
        """Send the fake host's packets for 127.0.0.0/8 to the host through the veth.

        This is how a neighbour on another interface would aim at services that the host
        publishes on loopback. Only routes and sysctls inside the namespace change, and the
        listeners never use loopback.
        """
        inside = ("-n", self.namespace)
        _ip(*inside, "route", "delete", "table", "local", "local", "127.0.0.0/8", "dev", "lo")
        _ip(*inside, "route", "delete", "table", "local", "local", "127.0.0.1", "dev", "lo")
        _ip(*inside, "route", "add", "127.0.0.0/8", "via", HOST_ADDRESS)
        # Without route_localnet the namespace would neither send to 127.0.0.0/8 through the
        # veth nor accept replies from there. A reply from 127.0.0.1, which lo still holds,
        # would also count as a martian source without accept_local.
        settings = [
            f"net.ipv4.conf.{interface}.route_localnet=1"
            for interface in ("all", self.peer_interface)
        ]
        settings.append(f"net.ipv4.conf.{self.peer_interface}.accept_local=1")
        for setting in settings:
            _run("ip", "netns", "exec", self.namespace, "sysctl", "-q", "-w", setting)

    def connects_to(self, address: str, port: int) -> bool:
        """Return whether the fake host opens a TCP connection to address:port within 2 s.

        The connection is routed through the host, as one from an outside network would be.
        """
        command = ["ip", "netns", "exec", self.namespace, sys.executable, "-I", "-c"]
        result = subprocess.run(
            [*command, CONNECT_SCRIPT, address, str(port)],
            capture_output=True,
            check=False,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )
        return result.returncode == 0


@contextlib.contextmanager
def running_listeners(
    workdir: Path,
    *,
    role: str,
    tcp_ports: tuple[int, ...] = (),
    udp_ports: tuple[int, ...] = (),
    dns_tcp_ports: tuple[int, ...] = (),
    dns_answer: str = FAKE_PROXY_DNS_ANSWER,
    namespace: str | None = None,
) -> Iterator[ListenerProcess]:
    """Run logging listeners on every address of the host or of `namespace`; stop them after.

    In a namespace they listen on IPv4 and IPv6, in the host namespace on IPv4 only. UDP ports
    and `dns_tcp_ports` answer DNS queries for *.test with `dns_answer`. Raises FakeNetError
    when the listener cannot bind a port.
    """
    command = [
        sys.executable,
        "-I",
        str(LISTENER_SCRIPT),
        f"--log={workdir / f'{role}.jsonl'}",
        f"--role={role}",
        f"--dns-answer={dns_answer}",
        *(f"--tcp={port}" for port in tcp_ports),
        *(f"--udp={port}" for port in udp_ports),
        *(f"--dns-tcp={port}" for port in dns_tcp_ports),
    ]
    if namespace is not None:
        # `ip netns exec` execs the command, so the pid is the listener's own.
        command = ["ip", "netns", "exec", namespace, *command, "--ipv6"]
    listener = ListenerProcess(command, log=workdir / f"{role}.jsonl", role=role)
    try:
        listener.wait_ready()
        yield listener
    finally:
        listener.stop()


@contextlib.contextmanager
def fake_proxy(
    workdir: Path,
    *,
    transparent_port: int = PROXY_TRANSPARENT_PORT,
    explicit_port: int = PROXY_EXPLICIT_PORT,
    dns_port: int = PROXY_DNS_PORT,
) -> Iterator[ListenerProcess]:
    """Stand in for the proxy: log what reaches its ports on every IPv4 address of the host.

    TCP hits carry the original destination from SO_ORIGINAL_DST, which shows the address and
    port that a redirected client connected to. The DNS port answers on UDP and TCP with
    FAKE_PROXY_DNS_ANSWER.
    """
    with running_listeners(
        workdir,
        role="fake-proxy",
        tcp_ports=(transparent_port, explicit_port),
        udp_ports=(dns_port,),
        dns_tcp_ports=(dns_port,),
    ) as listener:
        yield listener


@contextlib.contextmanager
def host_listeners(workdir: Path, *, tcp_ports: tuple[int, ...]) -> Iterator[ListenerProcess]:
    """Log TCP connections to `tcp_ports` on every IPv4 address of the host."""
    with running_listeners(workdir, role="host-listener", tcp_ports=tcp_ports) as listener:
        yield listener


@dataclass(frozen=True)
class FakeNamespace:
    """A network namespace with the fake hosts' addresses, joined to the host by a veth pair."""

    namespace: str
    host_interface: str
    peer_interface: str


@contextlib.contextmanager
def fake_internet(workdir: Path) -> Iterator[FakeInternet]:
    """Create the fake internet host with listeners; remove all of it on exit.

    Raises FakeNetError as fake_namespace() does, or when a listener cannot bind its ports.
    """
    with (
        fake_namespace() as created,
        running_listeners(
            workdir,
            role="fake-host",
            tcp_ports=FAKE_HOST_TCP_PORTS,
            udp_ports=FAKE_HOST_UDP_PORTS,
            dns_tcp_ports=(53,),
            dns_answer=FAKE_RESOLVER_ANSWER,
            namespace=created.namespace,
        ) as listener,
    ):
        yield FakeInternet(
            namespace=created.namespace,
            host_interface=created.host_interface,
            peer_interface=created.peer_interface,
            listener=listener,
        )


@contextlib.contextmanager
def fake_namespace() -> Iterator[FakeNamespace]:
    """Create the fake hosts' namespace, veth pair, addresses and routes; remove them on exit.

    The namespace contains FAKE_HOST, SECOND_FAKE_HOST, LINK_LOCAL_FAKE_HOST and FAKE_HOST_V6 and
    runs nothing; the caller starts the servers it needs inside it. Raises FakeNetError when an
    address of the fake network is already on this host, because another fake network runs or
    a killed run left one behind. Also raises it when a route does not lead into the veth pair,
    since a probe could then leave the machine.
    """
    _check_addresses_unused()
    name = f"ar-t-{secrets.token_hex(4)}"
    host_interface = f"{name}h"
    peer_interface = f"{name}n"

    with contextlib.ExitStack() as cleanup:
        _ip("netns", "add", name)
        cleanup.callback(_ip, "netns", "delete", name)
        _ip(
            "link",
            "add",
            host_interface,
            "type",
            "veth",
            "peer",
            "name",
            peer_interface,
            "netns",
            name,
        )
        # Deleting one end deletes both, and with them the host route through it.
        cleanup.callback(_ip_if_exists, host_interface, "link", "delete", host_interface)

        _ip("addr", "add", f"{HOST_ADDRESS}/24", "dev", host_interface)
        _ip("addr", "add", f"{SECOND_HOST_ADDRESS}/24", "dev", host_interface)
        _ip("-6", "addr", "add", f"{HOST_ADDRESS_V6}/64", "dev", host_interface, "nodad")
        _ip("link", "set", host_interface, "up")
        _ip("route", "add", f"{LINK_LOCAL_FAKE_HOST}/32", "dev", host_interface)

        inside = ("-n", name)
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "addr", "add", f"{FAKE_HOST}/24", "dev", peer_interface)
        _ip(*inside, "addr", "add", f"{SECOND_FAKE_HOST}/24", "dev", peer_interface)
        _ip(*inside, "addr", "add", f"{LINK_LOCAL_FAKE_HOST}/16", "dev", peer_interface)
        _ip(*inside, "-6", "addr", "add", f"{FAKE_HOST_V6}/64", "dev", peer_interface, "nodad")
        _ip(*inside, "link", "set", peer_interface, "up")
        _ip(*inside, "route", "add", "default", "via", HOST_ADDRESS)
        _ip(*inside, "-6", "route", "add", "default", "via", HOST_ADDRESS_V6)

        for address in (FAKE_HOST, SECOND_FAKE_HOST, LINK_LOCAL_FAKE_HOST, FAKE_HOST_V6):
            _check_route(address, host_interface)

        yield FakeNamespace(
            namespace=name, host_interface=host_interface, peer_interface=peer_interface
        )


def host_ipv4_addresses() -> dict[str, str]:
    """Return the host namespace's IPv4 addresses outside 127.0.0.0/8, mapped to interfaces."""
    links = json.loads(_ip("-j", "-4", "addr", "show"))
    return {
        info["local"]: link["ifname"]
        for link in links
        for info in link.get("addr_info", [])
        if not ipaddress.ip_address(info["local"]).is_loopback
    }


def default_route_interface() -> str | None:
    """Return the interface of the host's IPv4 default route, or None without one."""
    routes = json.loads(_ip("-j", "-4", "route", "show", "default"))
    return str(routes[0]["dev"]) if routes else None


def route_type(address: str) -> tuple[str, str]:
    """Return (route type, device) of the host's route to `address`, e.g. ("local", "lo")."""
    routes = json.loads(_ip("-j", "route", "get", address))
    route = routes[0]
    return str(route.get("type", "unicast")), str(route.get("dev", ""))


def _check_addresses_unused() -> None:
    for family in ("-4", "-6"):
        for link in json.loads(_ip("-j", family, "addr", "show")):
            for info in link.get("addr_info", []):
                address = ipaddress.ip_address(info["local"])
                if any(address in network for network in FAKE_NETWORKS):
                    raise FakeNetError(
                        f"address {address} of the fake network is already on interface "
                        f"{link['ifname']!r}; if a killed test run left it, remove it with: "
                        f"ip link delete {link['ifname']}"
                    )
    if _ip("route", "show", f"{LINK_LOCAL_FAKE_HOST}/32").strip():
        raise FakeNetError(f"a route to {LINK_LOCAL_FAKE_HOST} exists already; remove it first")


def _check_route(address: str, interface: str) -> None:
    kind, device = route_type(address)
    if device != interface:
        raise FakeNetError(
            f"the route to {address} goes through {device!r} ({kind}), not the fake network's "
            f"veth {interface!r}; a probe to it could leave this machine"
        )


def _ip(*args: str) -> str:
    return _run("ip", *args)


def _run(*command: str) -> str:
    try:
        result = subprocess.run(
            command,
            check=True,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )
    except subprocess.CalledProcessError as exc:
        raise FakeNetError(f"{' '.join(command)} failed: {exc.stderr.strip()}") from exc
    return result.stdout


def _ip_if_exists(interface: str, *args: str) -> None:
    # A veth pair disappears with its namespace's end, so it may be gone already.
    existing = subprocess.run(
        ["ip", "link", "show", interface],
        capture_output=True,
        check=False,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    if existing.returncode == 0:
        _ip(*args)
