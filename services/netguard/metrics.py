"""Prometheus metrics of netguard, served on an internal address only (`--metrics-bind`).

The firewall's state and every rule's packet counter are exported, so an operator sees from
outside whether agents are protected and which rule their traffic hits.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry()

FIREWALL_ENABLED = Gauge(
    "agent_runner_firewall_enabled",
    "1 while netguard enforces the firewall, 0 when it runs with --disable-firewall.",
    registry=REGISTRY,
)
FIREWALL_VERIFIED = Gauge(
    "agent_runner_firewall_verified",
    "1 when the last check found the live tables equal to the expected ones.",
    registry=REGISTRY,
)
FIREWALL_DRIFT = Counter(
    "agent_runner_firewall_drift",
    "Checks that found the live tables changed and applied them again.",
    registry=REGISTRY,
)
FIREWALL_AGENTS = Gauge(
    "agent_runner_firewall_agents", "Agent addresses registered with netguard.", registry=REGISTRY
)
RULE_PACKETS = Gauge(
    "agent_runner_firewall_rule_packets",
    "Packets counted by a rule since the tables were last applied.",
    ["rule"],
    registry=REGISTRY,
)


def serve(address: str, port: int) -> None:
    """Serve the metrics over HTTP on `address:port` from a background thread."""
    start_http_server(port, addr=address, registry=REGISTRY)


def record_counters(counts: dict[str, int]) -> None:
    """Export the packet counts of our rules, keyed by family and comment."""
    for rule, packets in counts.items():
        RULE_PACKETS.labels(rule=rule).set(packets)
