"""The sandbox firewall's probe matrix: where an agent's packets go, with and without netguard.

Each cell runs a probe inside a real agent started through the gateway and checks three
witnesses: the client's result, the logs of every listener that could have received the
packets (a fake internet host in its own network namespace, a fake proxy and a listener on
the host), and the packet counters of netguard's rules. A control phase first runs cells
while netguard runs with --disable-firewall and shows that the probes reach their targets
when nothing stops them (Docker masquerades the sandbox bridge), so a passing cell cannot come
from a probe that never worked. Every packet stays on this machine: the fake host's addresses
are documentation and link-local test addresses routed into a veth pair, and every other
target is a local address of the host or a container of this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import docker
import httpx
import pytest

from tests.integration.conftest import Tarball, make_tarball, trusted_sources
from tests.support.fakenet import (
    FAKE_HOST,
    FAKE_HOST_V6,
    FAKE_PROXY_DNS_ANSWER,
    FAKE_RESOLVER_ANSWER,
    HOST_ADDRESS,
    LINK_LOCAL_FAKE_HOST,
    PROXY_DNS_PORT,
    PROXY_EXPLICIT_PORT,
    PROXY_TRANSPARENT_PORT,
    SECOND_FAKE_HOST,
    FakeInternet,
    Hit,
    ListenerProcess,
    default_route_interface,
    fake_internet,
    fake_proxy,
    host_ipv4_addresses,
    host_listeners,
    route_type,
)
from tests.support.nft_counters import agent_set, counter_deltas, list_table, rule_counters
from tests.support.probe import (
    LATERAL_PORT,
    Outcome,
    ProbeAgent,
    ProbeResult,
    build_probe_image,
    dns_answer_address,
    dns_tcp_probe,
    dns_udp_probe,
    http_probe,
    start_probe_agent,
    tcp_probe,
)
from tests.support.stack import FileServer, Stack, agent_runtime, running_stack

pytestmark = pytest.mark.integration

NETWORK = "agent-runner-fw"
SUBNET = "172.29.4.0/24"
BRIDGE = "ar-fw0"
GATEWAY = "172.29.4.1"
ARBITRARY_PORT = 4444
SWEEP_WORKERS_PER_AGENT = 6

# Netguard's rules, keyed "<family>/<comment>" as tests.support.nft_counters reads them.
EGRESS_DROP = "inet/agent-runner:sandbox-egress-drop"
HOST_DROP = "inet/agent-runner:sandbox-to-host-drop"
TO_SANDBOX_DROP = "inet/agent-runner:to-sandbox-drop"
LOOPBACK_DROP = "inet/agent-runner:loopback-from-outside-v4"
AGENT_DROP = "bridge/agent-runner:agent-to-agent-drop"
AGENT_ARP_DROP = "bridge/agent-runner:agent-to-agent-arp-drop"
REDIRECT_HTTP = "inet/agent-runner:redirect-http"
REDIRECT_DNS_UDP = "inet/agent-runner:redirect-dns-udp"
REDIRECT_DNS_TCP = "inet/agent-runner:redirect-dns-tcp"
REDIRECT_DNS_UDP_GATEWAY = "inet/agent-runner:redirect-dns-udp-gateway"
TO_PROXY_EXPLICIT = "inet/agent-runner:to-proxy-explicit"
RULES_USED = (
    EGRESS_DROP,
    HOST_DROP,
    TO_SANDBOX_DROP,
    LOOPBACK_DROP,
    AGENT_DROP,
    AGENT_ARP_DROP,
    REDIRECT_HTTP,
    REDIRECT_DNS_UDP,
    REDIRECT_DNS_UDP_GATEWAY,
    REDIRECT_DNS_TCP,
    TO_PROXY_EXPLICIT,
)


@dataclass(frozen=True)
class Listeners:
    """Everything that could receive an agent's packets, each logging what it gets."""

    internet: FakeInternet
    proxy: ListenerProcess
    host: ListenerProcess

    def all(self) -> tuple[ListenerProcess, ...]:
        return (self.internet.listener, self.proxy, self.host)


@dataclass(frozen=True)
class Observation:
    """What one probe, or one batch of probes, left behind."""

    results: list[ProbeResult]
    hits: dict[str, list[Hit]]
    deltas: dict[str, int]

    @property
    def result(self) -> ProbeResult:
        """The only result of a single probe."""
        assert len(self.results) == 1
        return self.results[0]

    def hits_of(self, role: str) -> list[Hit]:
        return self.hits.get(role, [])


@dataclass(frozen=True)
class Control:
    """Cells run while netguard ran with --disable-firewall."""

    observations: dict[str, Observation]
    table_absent: bool
    ping_fake_host: ProbeResult
    ping_gateway: ProbeResult
    inbound_connected: bool
    agent_address: str


@dataclass(frozen=True)
class Agents:
    """The two probe agents of the firewalled phase: `prober` probes, `peer` is probed."""

    prober: ProbeAgent
    peer: ProbeAgent


def observe(
    listeners: Listeners,
    probes: list[Callable[[], ProbeResult]],
    *,
    table: str | None,
    workers: int = 1,
) -> Observation:
    """Run probes (concurrently with workers > 1) and collect listener hits and counter deltas.

    Listeners log a hit before they reply and counters count in the packet path, so both are
    complete when the clients have returned.
    """
    marks = {listener.role: listener.mark() for listener in listeners.all()}
    before = rule_counters(table) if table else {}

    if workers == 1:
        results = [probe() for probe in probes]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda probe: probe(), probes))

    after = rule_counters(table) if table else {}
    hits = {
        listener.role: listener.hits(since=marks[listener.role]) for listener in listeners.all()
    }
    return Observation(results=results, hits=hits, deltas=counter_deltas(before, after))


def run_as(agent: ProbeAgent, command: str) -> Callable[[], ProbeResult]:
    return lambda: agent.run(command)


def wait_for_supervisor_text(stack: Stack, text: str, *, offset: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in stack.log_text("supervisor")[offset:]:
            return
        time.sleep(0.1)
    raise AssertionError(f"the supervisor did not log {text!r} within {timeout:g} s")


def new_log_text(agent: ProbeAgent, before: str) -> str:
    text = agent.logs()
    assert text.startswith(before), "the agent's log was rewritten"
    return text[len(before) :]


@pytest.fixture(scope="module")
def probe_tarball(docker_client: docker.DockerClient, served: FileServer) -> Iterator[Tarball]:
    image_id = build_probe_image(docker_client)
    yield make_tarball(docker_client, served, image_id, "probe.tar")
    # The stack loaded the image again from the tarball, under the same ID.
    with contextlib.suppress(docker.errors.NotFound):
        docker_client.images.remove(image_id, force=True)


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listeners]:
    workdir = tmp_path_factory.mktemp("fakenet")
    with (
        fake_internet(workdir) as internet,
        fake_proxy(workdir) as proxy,
        host_listeners(workdir, tcp_ports=(ARBITRARY_PORT,)) as host,
    ):
        internet.route_loopback_to_host()
        yield Listeners(internet=internet, proxy=proxy, host=host)


@pytest.fixture(scope="module")
def fw_stack(
    tmp_path_factory: pytest.TempPathFactory,
    probe_tarball: Tarball,
    listeners: Listeners,
    served: FileServer,
) -> Iterator[Stack]:
    # The stack starts with the firewall disabled for the control phase. The `firewalled`
    # fixture restarts netguard with the firewall on.
    with running_stack(
        tmp_path_factory.mktemp("fw-stack"),
        network=NETWORK,
        subnet=SUBNET,
        bridge=BRIDGE,
        netguard_args=["--disable-firewall"],
        supervisor_args=[
            "--agent-start-timeout=20",
            "--agent-stop-grace=2",
            *trusted_sources(served.url("")),
        ],
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def fw_api(fw_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fw_stack.api_url, headers=fw_stack.headers, timeout=60) as api:
        yield api


def start_agent(api: httpx.Client, client: docker.DockerClient, tarball: Tarball) -> ProbeAgent:
    return start_probe_agent(
        api, client, image_url=tarball.url, image_digest=tarball.digest, network=NETWORK
    )


@dataclass(frozen=True)
class ControlCell:
    """A probe of the control phase and the listener, protocol and port it should reach."""

    command: str
    role: str
    protocol: str
    port: int


CONTROL_CELLS = {
    "tcp-22": ControlCell(tcp_probe(FAKE_HOST, 22), "fake-host", "tcp", 22),
    "udp-9999": ControlCell(
        dns_udp_probe("x.test", FAKE_HOST, port=9999), "fake-host", "udp", 9999
    ),
    "dns-by-ip": ControlCell(dns_udp_probe("x.test", FAKE_HOST), "fake-host", "udp", 53),
    "http-80": ControlCell(http_probe(f"http://{FAKE_HOST}/"), "fake-host", "tcp", 80),
    "link-local-22": ControlCell(tcp_probe(LINK_LOCAL_FAKE_HOST, 22), "fake-host", "tcp", 22),
    "gateway-arbitrary-port": ControlCell(
        tcp_probe(GATEWAY, ARBITRARY_PORT), "host-listener", "tcp", ARBITRARY_PORT
    ),
}


@pytest.fixture(scope="module")
def control(
    fw_stack: Stack,
    fw_api: httpx.Client,
    docker_client: docker.DockerClient,
    probe_tarball: Tarball,
    listeners: Listeners,
) -> Control:
    """Run the control cells with the firewall disabled, then stop the control agent."""
    table_absent = list_table("inet", fw_stack.firewall_table) is None
    agent = start_agent(fw_api, docker_client, probe_tarball)
    try:
        observations = {
            name: observe(listeners, [run_as(agent, cell.command)], table=None)
            for name, cell in CONTROL_CELLS.items()
        }
        ping_fake_host = agent.ping(FAKE_HOST)
        ping_gateway = agent.ping(GATEWAY)
        inbound_connected = listeners.internet.connects_to(agent.address, 80)
    finally:
        fw_api.delete(f"/v1/agents/{agent.agent_id}")
    return Control(
        observations=observations,
        table_absent=table_absent,
        ping_fake_host=ping_fake_host,
        ping_gateway=ping_gateway,
        inbound_connected=inbound_connected,
        agent_address=agent.address,
    )


@pytest.fixture(scope="module")
def firewalled(control: Control, fw_stack: Stack) -> Stack:
    """Restart netguard with the firewall on, after the control phase, and return the stack."""
    offset = len(fw_stack.log_text("supervisor"))
    fw_stack.stop_service("netguard")
    fw_stack.netguard_args = []
    fw_stack.start_netguard()
    # Agents must start under the verified firewall, not under the last disabled state.
    wait_for_supervisor_text(fw_stack, "enabled=True verified=True", offset=offset, timeout=20)
    return fw_stack


@pytest.fixture(scope="module")
def agents(
    firewalled: Stack,
    fw_api: httpx.Client,
    docker_client: docker.DockerClient,
    probe_tarball: Tarball,
) -> Agents:
    prober = start_agent(fw_api, docker_client, probe_tarball)
    peer = start_agent(fw_api, docker_client, probe_tarball)
    return Agents(prober=prober, peer=peer)


# Control phase: with the firewall disabled, the probes reach their targets.


@pytest.mark.parametrize("name", sorted(CONTROL_CELLS))
def test_control_probe_reaches_target(control: Control, name: str) -> None:
    cell = CONTROL_CELLS[name]
    observation = control.observations[name]
    reached = [(hit.protocol, hit.port) for hit in observation.hits_of(cell.role)]

    assert observation.result.outcome is Outcome.SUCCEEDED, str(observation.result)
    assert (cell.protocol, cell.port) in reached, observation.hits
    assert observation.hits_of("fake-proxy") == []


def test_control_runs_without_tables(control: Control) -> None:
    assert control.table_absent


def test_control_tcp_reaches_fake_host_masqueraded(control: Control) -> None:
    observation = control.observations["tcp-22"]

    assert "fake-host port=22" in observation.result.text
    [hit] = observation.hits_of("fake-host")
    assert (hit.protocol, hit.local, hit.port) == ("tcp", FAKE_HOST, 22)
    # Docker's masquerade rule rewrote the agent's address to the veth's host end.
    assert hit.peer == HOST_ADDRESS


def test_control_dns_answered_by_fake_resolver(control: Control) -> None:
    observation = control.observations["dns-by-ip"]

    assert f"Address: {FAKE_RESOLVER_ANSWER}" in observation.result.text
    assert any(hit.dns_name == "x.test" for hit in observation.hits_of("fake-host"))


def test_control_link_local_reaches_fake_host(control: Control) -> None:
    [hit] = control.observations["link-local-22"].hits_of("fake-host")

    assert (hit.local, hit.port) == (LINK_LOCAL_FAKE_HOST, 22)


def test_control_host_port_reachable(control: Control) -> None:
    [hit] = control.observations["gateway-arbitrary-port"].hits_of("host-listener")

    assert (hit.local, hit.port, hit.peer) == (GATEWAY, ARBITRARY_PORT, control.agent_address)


def test_control_icmp_answered(control: Control) -> None:
    assert control.ping_fake_host.outcome is Outcome.SUCCEEDED, str(control.ping_fake_host)
    assert control.ping_gateway.outcome is Outcome.SUCCEEDED, str(control.ping_gateway)


def test_control_fake_host_reaches_agent(control: Control) -> None:
    # Docker accepts forwarded traffic to a published container port from any interface,
    # even when the port is published on loopback only.
    assert control.inbound_connected


# Firewalled phase.


def test_rules_found_by_comment(firewalled: Stack) -> None:
    names = set(rule_counters(firewalled.firewall_table))

    for rule in RULES_USED:
        assert rule in names, f"no rule {rule!r}; the tables hold {sorted(names)}"


def test_agents_registered_in_set(agents: Agents, firewalled: Stack) -> None:
    registered = agent_set(firewalled.firewall_table)

    assert agents.prober.address in registered
    assert agents.peer.address in registered


def test_agent_namespace_has_no_ipv6(agents: Agents) -> None:
    disabled = agents.prober.run("cat /proc/sys/net/ipv6/conf/all/disable_ipv6")
    addresses = agents.prober.run("ip -6 addr show")

    # gVisor (runsc 0.0~20221219) has no such sysctl file and configures no IPv6 address.
    if agent_runtime() == "runc":
        assert disabled.text.strip() == "1", str(disabled)
    assert addresses.text.strip() == "", str(addresses)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(tcp_probe(FAKE_HOST, 22), id="tcp-22"),
        pytest.param(dns_udp_probe("x.test", FAKE_HOST, port=9999), id="udp-9999"),
        pytest.param(tcp_probe(FAKE_HOST, 853), id="dns-over-tls-853"),
        pytest.param(dns_udp_probe("x.test", FAKE_HOST, port=443), id="quic-udp-443"),
        pytest.param(tcp_probe(FAKE_HOST, 5353), id="tcp-5353"),
        pytest.param(tcp_probe(SECOND_FAKE_HOST, 22), id="other-network-tcp-22"),
        pytest.param(tcp_probe(LINK_LOCAL_FAKE_HOST, 22), id="link-local-tcp-22"),
        pytest.param(
            dns_udp_probe("x.test", LINK_LOCAL_FAKE_HOST, port=9999), id="link-local-udp-9999"
        ),
    ],
)
def test_forwarded_traffic_dropped(
    agents: Agents, listeners: Listeners, firewalled: Stack, command: str
) -> None:
    observation = observe(
        listeners, [run_as(agents.prober, command)], table=firewalled.firewall_table
    )

    assert observation.hits_of("fake-host") == []
    assert observation.hits_of("fake-proxy") == []
    assert observation.result.outcome is Outcome.TIMED_OUT, str(observation.result)
    assert observation.deltas.get(EGRESS_DROP, 0) >= 1, observation.deltas


@pytest.mark.parametrize(
    ("target", "rule"),
    [
        pytest.param(FAKE_HOST, EGRESS_DROP, id="fake-host"),
        pytest.param(GATEWAY, HOST_DROP, id="gateway"),
    ],
)
def test_icmp_dropped(agents: Agents, firewalled: Stack, target: str, rule: str) -> None:
    before = rule_counters(firewalled.firewall_table)
    result = agents.prober.ping(target)
    deltas = counter_deltas(before, rule_counters(firewalled.firewall_table))

    # icmp-echo exits 1 with "no reply" only after its request was sent, so a socket that
    # could not be opened or a request that could not be sent fails here, not silently.
    assert result.outcome is Outcome.FAILED, str(result)
    assert result.exit_code == 1, str(result)
    assert result.text == "no reply\n", str(result)
    assert deltas.get(rule, 0) >= 1, deltas


@pytest.mark.parametrize(
    ("server", "rule"),
    [
        pytest.param(FAKE_HOST, REDIRECT_DNS_UDP, id="fake-host"),
        pytest.param(SECOND_FAKE_HOST, REDIRECT_DNS_UDP, id="second-fake-host"),
        # The resolver in every agent's resolv.conf.
        pytest.param(GATEWAY, REDIRECT_DNS_UDP_GATEWAY, id="gateway"),
    ],
)
def test_dns_by_address_goes_to_proxy(
    agents: Agents, listeners: Listeners, firewalled: Stack, server: str, rule: str
) -> None:
    observation = observe(
        listeners,
        [run_as(agents.prober, dns_udp_probe("x.test", server))],
        table=firewalled.firewall_table,
    )
    proxy_hits = observation.hits_of("fake-proxy")

    assert observation.result.outcome is Outcome.SUCCEEDED, str(observation.result)
    assert f"Address: {FAKE_PROXY_DNS_ANSWER}" in observation.result.text
    assert f"Address: {FAKE_RESOLVER_ANSWER}" not in observation.result.text
    assert proxy_hits, "the fake proxy's DNS port received nothing"
    for hit in proxy_hits:
        assert (hit.protocol, hit.port, hit.peer) == ("udp", PROXY_DNS_PORT, agents.prober.address)
        assert hit.dns_name == "x.test"
    assert observation.hits_of("fake-host") == []
    assert observation.deltas.get(rule, 0) >= 1, observation.deltas


def test_dns_over_tcp_goes_to_proxy(
    agents: Agents, listeners: Listeners, firewalled: Stack
) -> None:
    observation = observe(
        listeners,
        [run_as(agents.prober, dns_tcp_probe("x.test", FAKE_HOST))],
        table=firewalled.firewall_table,
    )

    assert observation.result.outcome is Outcome.SUCCEEDED, str(observation.result)
    assert dns_answer_address(observation.result.output) == FAKE_PROXY_DNS_ANSWER
    [hit] = observation.hits_of("fake-proxy")
    assert (hit.protocol, hit.port, hit.original_dst) == ("tcp", PROXY_DNS_PORT, f"{FAKE_HOST}:53")
    assert hit.dns_name == "x.test"
    assert observation.hits_of("fake-host") == []
    assert observation.deltas.get(REDIRECT_DNS_TCP, 0) >= 1, observation.deltas


@pytest.mark.parametrize(
    ("command", "destination"),
    [
        pytest.param(http_probe(f"http://{FAKE_HOST}/"), f"{FAKE_HOST}:80", id="http"),
        pytest.param(tcp_probe(FAKE_HOST, 443), f"{FAKE_HOST}:443", id="https"),
        pytest.param(tcp_probe(SECOND_FAKE_HOST, 443), f"{SECOND_FAKE_HOST}:443", id="other-net"),
        # TCP 80 and 443 go to the proxy whatever their destination; the proxy, not the
        # firewall, rejects link-local and metadata addresses.
        pytest.param(
            http_probe(f"http://{LINK_LOCAL_FAKE_HOST}/"),
            f"{LINK_LOCAL_FAKE_HOST}:80",
            id="link-local-http",
        ),
    ],
)
def test_web_traffic_goes_to_proxy(
    agents: Agents, listeners: Listeners, firewalled: Stack, command: str, destination: str
) -> None:
    observation = observe(
        listeners, [run_as(agents.prober, command)], table=firewalled.firewall_table
    )

    assert observation.result.outcome is Outcome.SUCCEEDED, str(observation.result)
    expected = f"fake-proxy port={PROXY_TRANSPARENT_PORT} original={destination}"
    assert expected in observation.result.text
    [hit] = observation.hits_of("fake-proxy")
    assert (hit.port, hit.original_dst, hit.peer) == (
        PROXY_TRANSPARENT_PORT,
        destination,
        agents.prober.address,
    )
    assert observation.hits_of("fake-host") == []
    assert observation.deltas.get(REDIRECT_HTTP, 0) >= 1, observation.deltas


def test_explicit_proxy_port_reachable(
    agents: Agents, listeners: Listeners, firewalled: Stack
) -> None:
    observation = observe(
        listeners,
        [run_as(agents.prober, tcp_probe(GATEWAY, PROXY_EXPLICIT_PORT))],
        table=firewalled.firewall_table,
    )

    assert observation.result.outcome is Outcome.SUCCEEDED, str(observation.result)
    [hit] = observation.hits_of("fake-proxy")
    assert (hit.port, hit.original_dst) == (PROXY_EXPLICIT_PORT, f"{GATEWAY}:{PROXY_EXPLICIT_PORT}")
    assert observation.deltas.get(TO_PROXY_EXPLICIT, 0) >= 1, observation.deltas


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(tcp_probe(GATEWAY, PROXY_TRANSPARENT_PORT), id="transparent-tcp"),
        pytest.param(tcp_probe(GATEWAY, PROXY_DNS_PORT), id="dns-tcp"),
        pytest.param(dns_udp_probe("x.test", GATEWAY, port=PROXY_DNS_PORT), id="dns-udp"),
    ],
)
def test_proxy_ports_only_through_redirect(
    agents: Agents, listeners: Listeners, firewalled: Stack, command: str
) -> None:
    # Agents may open only the explicit port directly. The transparent and DNS ports serve
    # redirected traffic, because a direct connection has no other original destination.
    observation = observe(
        listeners, [run_as(agents.prober, command)], table=firewalled.firewall_table
    )

    assert observation.hits_of("fake-proxy") == [], "a direct connection reached the proxy"
    assert observation.result.outcome is Outcome.TIMED_OUT, str(observation.result)
    assert observation.deltas.get(HOST_DROP, 0) >= 1, observation.deltas


@pytest.mark.parametrize("port", [80, LATERAL_PORT])
def test_other_agent_unreachable_by_arp(
    agents: Agents, listeners: Listeners, firewalled: Stack, port: int
) -> None:
    peer_log = agents.peer.logs()
    agents.prober.forget_neighbour(agents.peer.address)

    observation = observe(
        listeners,
        [run_as(agents.prober, tcp_probe(agents.peer.address, port))],
        table=firewalled.firewall_table,
    )

    assert agents.prober.address not in new_log_text(agents.peer, peer_log)
    assert observation.hits_of("fake-proxy") == []
    # Without an ARP reply the kernel gives up with "No route to host", or timeout ends nc.
    assert observation.result.outcome is not Outcome.SUCCEEDED, str(observation.result)
    assert observation.deltas.get(AGENT_ARP_DROP, 0) >= 1, observation.deltas


@pytest.mark.parametrize("port", [80, LATERAL_PORT])
def test_other_agent_unreachable_with_known_mac(
    agents: Agents, listeners: Listeners, firewalled: Stack, port: int
) -> None:
    peer_log = agents.peer.logs()
    agents.prober.teach_neighbour(agents.peer.address, agents.peer.mac)
    try:
        observation = observe(
            listeners,
            [run_as(agents.prober, tcp_probe(agents.peer.address, port))],
            table=firewalled.firewall_table,
        )
    finally:
        agents.prober.forget_neighbour(agents.peer.address)

    assert agents.prober.address not in new_log_text(agents.peer, peer_log)
    # With br_netfilter, bridged IPv4 also passes the inet table's redirect chain, which
    # would hand TCP 80 and 443 to the proxy instead of the bridge table dropping them.
    assert observation.hits_of("fake-proxy") == [], "traffic to another agent reached the proxy"
    assert observation.result.outcome is Outcome.TIMED_OUT, str(observation.result)
    # Without the taught MAC the agent would send only ARP requests, so an IPv4 frame counted
    # here also shows that teach_neighbour worked.
    assert observation.deltas.get(AGENT_DROP, 0) >= 1, observation.deltas


def test_fake_host_cannot_reach_agent(
    agents: Agents, listeners: Listeners, firewalled: Stack
) -> None:
    peer_log = agents.peer.logs()
    before = rule_counters(firewalled.firewall_table)

    connected = listeners.internet.connects_to(agents.peer.address, 80)

    deltas = counter_deltas(before, rule_counters(firewalled.firewall_table))
    assert FAKE_HOST not in new_log_text(agents.peer, peer_log)
    assert not connected
    assert deltas.get(TO_SANDBOX_DROP, 0) >= 1, deltas


def test_loopback_from_outside_dropped(
    agents: Agents, listeners: Listeners, firewalled: Stack
) -> None:
    # The loopback rule matches on every interface, so when another netguard runs on this
    # host (the test session's own stack, say) either table's rule may drop the packet first.
    peer_log = agents.peer.logs()
    before = loopback_drops_everywhere()

    connected = listeners.internet.connects_to("127.0.0.1", agents.peer.published_port)

    assert FAKE_HOST not in new_log_text(agents.peer, peer_log)
    assert not connected
    assert loopback_drops_everywhere() > before


def loopback_drops_everywhere() -> int:
    """Return the packets counted by every netguard table's loopback-from-outside rule."""
    listing = subprocess.run(
        ["nft", "-j", "list", "ruleset"], capture_output=True, text=True, check=True
    ).stdout
    total = 0
    for item in json.loads(listing)["nftables"]:
        rule = item.get("rule")
        if not rule or rule.get("comment") != "agent-runner:loopback-from-outside-v4":
            continue
        for expression in rule["expr"]:
            if isinstance(expression.get("counter"), dict):
                total += int(expression["counter"]["packets"])
    return total


def sweep_targets(stack: Stack, client: docker.DockerClient) -> list[tuple[str, int]]:
    """Return (address, port) of every host service an agent could aim at.

    Addresses are the host's IPv4 addresses except loopback, which a container cannot route
    to. Addresses on the bridges of other Docker networks are left out too, because other
    test stacks and benchmarks create and remove those at any time. An address removed
    between this check and the probe would be routed off this machine.
    """
    foreign_bridges = {
        bridge_name(network.attrs)
        for network in client.networks.list(filters={"driver": "bridge"})
        if network.name not in (NETWORK, "bridge")
    }
    addresses = sorted(
        address
        for address, interface in host_ipv4_addresses().items()
        if interface not in foreign_bridges
    )
    ports = {
        stack.nats_port,
        stack.api_port,
        ARBITRARY_PORT,
        port_of(os.environ["AGENT_RUNNER_NATS_URL"]),
        port_of(os.environ["AGENT_RUNNER_REDIS_URL"]),
    }
    targets = [(address, port) for address in addresses for port in sorted(ports)]
    # The explicit proxy port is open on the gateway address only.
    targets += [(address, PROXY_EXPLICIT_PORT) for address in addresses if address != GATEWAY]
    return targets


def bridge_name(attrs: dict[str, Any]) -> str:
    """Return the Linux bridge of a Docker bridge network, named by option or by Docker."""
    options = attrs.get("Options") or {}
    return str(options.get("com.docker.network.bridge.name") or f"br-{attrs['Id'][:12]}")


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, f"no port in {url!r}"
    return port


def test_host_addresses_unreachable(
    agents: Agents, listeners: Listeners, firewalled: Stack, docker_client: docker.DockerClient
) -> None:
    targets = sweep_targets(firewalled, docker_client)
    addresses = {address for address, _ in targets}
    primary = default_route_interface()
    assert GATEWAY in addresses
    assert HOST_ADDRESS in addresses
    if primary is not None:
        primary_addresses = {
            address for address, interface in host_ipv4_addresses().items() if interface == primary
        }
        assert primary_addresses & addresses, f"no address of {primary!r} in {addresses}"
    for address in addresses:
        assert route_type(address)[0] == "local", f"{address} is no longer a local address"
    # Split between both agents, so each runs a few probes at a time, far below its pids limit.
    probes = [
        run_as(
            agents.prober if index % 2 == 0 else agents.peer,
            tcp_probe(address, port),
        )
        for index, (address, port) in enumerate(targets)
    ]

    observation = observe(
        listeners,
        probes,
        table=firewalled.firewall_table,
        workers=2 * SWEEP_WORKERS_PER_AGENT,
    )

    for address in addresses:
        assert route_type(address)[0] == "local", f"{address} was removed during the sweep"
    for (address, port), result in zip(targets, observation.results, strict=True):
        assert result.outcome is Outcome.TIMED_OUT, f"{address}:{port}: {result}"
    assert observation.hits_of("host-listener") == []
    assert observation.hits_of("fake-proxy") == []
    # Every dropped connection attempt sends at least one SYN.
    assert observation.deltas.get(HOST_DROP, 0) >= len(targets), observation.deltas


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(tcp_probe(FAKE_HOST_V6, 80), id="tcp-80"),
        pytest.param(tcp_probe(FAKE_HOST_V6, 22), id="tcp-22"),
        pytest.param(http_probe(f"http://[{FAKE_HOST_V6}]/"), id="http"),
    ],
)
def test_ipv6_fails_and_reaches_nothing(
    agents: Agents, listeners: Listeners, firewalled: Stack, command: str
) -> None:
    observation = observe(
        listeners, [run_as(agents.prober, command)], table=firewalled.firewall_table
    )

    assert observation.result.outcome is Outcome.FAILED, str(observation.result)
    assert observation.hits_of("fake-host") == []
    assert observation.hits_of("fake-proxy") == []
