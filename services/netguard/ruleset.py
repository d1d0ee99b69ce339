"""The sandbox firewall as nftables JSON: what netguard applies and later checks.

Two tables of our own, both named `agent_runner`, replaced whole in one transaction:

- `inet agent_runner` sees routed traffic. Agents are matched by the interface their packets
  arrive on (the sandbox bridge), not by source address, so an agent cannot escape a rule by
  forging its address. Chains and why their priorities win over Docker's iptables-nft rules:
  - `guard_prerouting` (filter, priority raw = -300): drops packets for 127.0.0.0/8 and ::1
    arriving on any interface but `lo`, before Docker's DNAT (dstnat = -100) could map them
    to a published agent port.
  - `redirect_to_proxy` (nat, priority dstnat - 10 = -110): sends TCP 80/443 of registered agents to
    the proxy's transparent port and UDP/TCP 53 to its DNS port, before Docker's nat chain,
    which returns for traffic from user-defined bridges anyway.
  - `guard_input` (filter, priority filter - 10 = -10): from the bridge, only replies of
    connections the host opened, connections to the explicit proxy port on the gateway
    address, and connections the redirect sent to the transparent or DNS port are accepted;
    everything else aimed at any local address is dropped, whatever Docker's INPUT chain
    would do later. An accept here is not final, a drop is.
  - `guard_forward` (filter, priority filter - 10): every routed packet from or to the
    sandbox bridge is dropped, so agents reach no other network, link-local or metadata
    address, and no neighbour reaches an agent through the bridge or a Docker DNAT.
- `bridge agent_runner` sees frames switched between two ports of a bridge, which the inet
  table never sees. `guard_forward` drops IPv4 and ARP between addresses of the sandbox
  subnet, so agents cannot reach or ARP-spoof each other even with ICC left on. The kernel
  here cannot match the bridge name there (`meta ibrname`), hence the subnet match.

Every rule carries a counter and a comment starting with `agent-runner:`, by which the checks,
the tests and an operator reading `nft list ruleset` find it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

DEFAULT_TABLE = "agent_runner"
AGENT_SET = "agents"
COMMENT_PREFIX = "agent-runner:"

Expression = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class RulesetConfig:
    """What the ruleset depends on; equal configs give byte-identical rulesets."""

    table: str
    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address
    transparent_port: int
    dns_port: int
    explicit_port: int


@dataclass(frozen=True)
class Rule:
    """One rule of a chain; `comment` is its stable name."""

    family: str
    chain: str
    comment: str
    expr: tuple[Expression, ...]


@dataclass(frozen=True)
class Chain:
    """One base chain."""

    family: str
    name: str
    type: str
    hook: str
    priority: int


def _match(left: Expression, right: Any, op: str = "==") -> Expression:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Expression:
    return {"meta": {"key": key}}


def _field(protocol: str, name: str) -> Expression:
    return {"payload": {"protocol": protocol, "field": name}}


def _prefix(network: IPv4Network) -> Expression:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


COUNTER: Expression = {"counter": None}
DROP: Expression = {"drop": None}
ACCEPT: Expression = {"accept": None}

CHAINS = (
    Chain(family="inet", name="guard_prerouting", type="filter", hook="prerouting", priority=-300),
    Chain(family="inet", name="redirect_to_proxy", type="nat", hook="prerouting", priority=-110),
    Chain(family="inet", name="guard_input", type="filter", hook="input", priority=-10),
    Chain(family="inet", name="guard_forward", type="filter", hook="forward", priority=-10),
    Chain(family="bridge", name="guard_forward", type="filter", hook="forward", priority=-10),
)


def rules(config: RulesetConfig) -> list[Rule]:
    """Return every rule of both tables, in chain order."""
    from_bridge = _match(_meta("iifname"), config.bridge)
    registered = _match(_field("ip", "saddr"), f"@{AGENT_SET}")
    to_gateway = _match(_field("ip", "daddr"), str(config.gateway))
    subnet = _prefix(config.subnet)
    # Traffic between agents is bridged, but with bridge-nf-call-iptables set it passes these
    # chains too; excluding the subnet leaves it to the bridge table's drop.
    not_to_sandbox = _match(_field("ip", "daddr"), subnet, "!=")
    # The transparent and DNS ports take only what the redirect sent there; a direct
    # connection would make the proxy's original destination the proxy itself.
    redirected = _match({"ct": {"key": "status"}}, "dnat", "in")

    def rule(family: str, chain: str, name: str, *expr: Expression) -> Rule:
        # The last expression is the verdict or NAT statement; the counter goes before it.
        return Rule(family, chain, COMMENT_PREFIX + name, (*expr[:-1], COUNTER, expr[-1]))

    return [
        rule(
            "inet",
            "guard_prerouting",
            "loopback-from-outside-v4",
            _match(_meta("iifname"), "lo", "!="),
            _match(_field("ip", "daddr"), {"prefix": {"addr": "127.0.0.0", "len": 8}}),
            DROP,
        ),
        rule(
            "inet",
            "guard_prerouting",
            "loopback-from-outside-v6",
            _match(_meta("iifname"), "lo", "!="),
            _match(_field("ip6", "daddr"), "::1"),
            DROP,
        ),
        rule(
            "inet",
            "redirect_to_proxy",
            "redirect-http",
            from_bridge,
            registered,
            not_to_sandbox,
            _match(_field("tcp", "dport"), {"set": [80, 443]}),
            {"redirect": {"port": config.transparent_port}},
        ),
        # Agents' resolv.conf names the gateway, which is inside the sandbox subnet, so DNS
        # to it needs rules of its own.
        *(
            rule(
                "inet",
                "redirect_to_proxy",
                f"redirect-dns-{protocol}{suffix}",
                from_bridge,
                registered,
                destination,
                _match(_field(protocol, "dport"), 53),
                {"redirect": {"port": config.dns_port}},
            )
            for protocol in ("udp", "tcp")
            for suffix, destination in (("", not_to_sandbox), ("-gateway", to_gateway))
        ),
        rule(
            "inet",
            "guard_input",
            "host-replies",
            from_bridge,
            _match({"ct": {"key": "state"}}, "established", "in"),
            _match({"ct": {"key": "direction"}}, "reply"),
            ACCEPT,
        ),
        rule(
            "inet",
            "guard_input",
            "to-proxy-explicit",
            from_bridge,
            registered,
            to_gateway,
            _match(_field("tcp", "dport"), config.explicit_port),
            ACCEPT,
        ),
        rule(
            "inet",
            "guard_input",
            "to-proxy-redirected-tcp",
            from_bridge,
            registered,
            redirected,
            to_gateway,
            _match(
                _field("tcp", "dport"), {"set": sorted({config.transparent_port, config.dns_port})}
            ),
            ACCEPT,
        ),
        rule(
            "inet",
            "guard_input",
            "to-proxy-redirected-udp",
            from_bridge,
            registered,
            redirected,
            to_gateway,
            _match(_field("udp", "dport"), config.dns_port),
            ACCEPT,
        ),
        rule("inet", "guard_input", "sandbox-to-host-drop", from_bridge, DROP),
        rule("inet", "guard_forward", "sandbox-egress-drop", from_bridge, DROP),
        rule(
            "inet",
            "guard_forward",
            "to-sandbox-drop",
            _match(_meta("oifname"), config.bridge),
            DROP,
        ),
        rule(
            "bridge",
            "guard_forward",
            "agent-to-agent-drop",
            _match(_field("ether", "type"), "ip"),
            _match(_field("ip", "saddr"), subnet),
            DROP,
        ),
        rule(
            "bridge",
            "guard_forward",
            "agent-to-agent-arp-drop",
            _match(_field("ether", "type"), "arp"),
            _match(_field("arp", "saddr ip"), subnet),
            DROP,
        ),
    ]


def apply_batch(config: RulesetConfig, agents: list[str]) -> dict[str, Any]:
    """Return one JSON transaction that replaces both tables with the ruleset and `agents`.

    Adding a table before deleting it makes the delete succeed on a first run, so the same
    batch creates or replaces. The kernel applies all of it or none of it.
    """
    commands: list[dict[str, Any]] = []
    for family in ("inet", "bridge"):
        table = {"family": family, "name": config.table}
        commands += [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            {"add": {"table": table}},
        ]
    commands.append(
        {
            "add": {
                "set": {
                    "family": "inet",
                    "table": config.table,
                    "name": AGENT_SET,
                    "type": "ipv4_addr",
                }
            }
        }
    )
    if agents:
        commands.append(
            {
                "add": {
                    "element": {
                        "family": "inet",
                        "table": config.table,
                        "name": AGENT_SET,
                        "elem": sorted(agents),
                    }
                }
            }
        )
    for chain in CHAINS:
        commands.append(
            {
                "add": {
                    "chain": {
                        "family": chain.family,
                        "table": config.table,
                        "name": chain.name,
                        "type": chain.type,
                        "hook": chain.hook,
                        "prio": chain.priority,
                        "policy": "accept",
                    }
                }
            }
        )
    for rule in rules(config):
        commands.append(
            {
                "add": {
                    "rule": {
                        "family": rule.family,
                        "table": config.table,
                        "chain": rule.chain,
                        "expr": list(rule.expr),
                        "comment": rule.comment,
                    }
                }
            }
        )
    return {"nftables": commands}


def delete_batch(table_name: str) -> dict[str, Any]:
    """Return a transaction that removes both of our tables if they exist."""
    commands: list[dict[str, Any]] = []
    for family in ("inet", "bridge"):
        table = {"family": family, "name": table_name}
        commands += [{"add": {"table": table}}, {"delete": {"table": table}}]
    return {"nftables": commands}


def canonical(listing: list[dict[str, Any]]) -> dict[str, Any]:
    """Reduce `nft -j list table` output to what defines behaviour.

    Handles, counter values and set elements are left out: they change without the rules
    changing. The result is what drift checks compare and what the ruleset hash covers.
    """
    chains = []
    rule_list = []
    for item in listing:
        if "chain" in item:
            chain = item["chain"]
            chains.append(
                {
                    key: chain.get(key)
                    for key in ("family", "name", "type", "hook", "prio", "policy")
                }
            )
        elif "rule" in item:
            rule = item["rule"]
            expr = [e for e in rule.get("expr", []) if "counter" not in e]
            rule_list.append(
                {
                    "family": rule["family"],
                    "chain": rule["chain"],
                    "comment": rule.get("comment"),
                    "expr": expr,
                }
            )
    return {"chains": chains, "rules": rule_list}


def ruleset_hash(canonical_form: dict[str, Any]) -> str:
    """Return the SHA-256 of a canonical ruleset, as `sha256:<hex>`."""
    data = json.dumps(canonical_form, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def counters(listing: list[dict[str, Any]]) -> dict[str, int]:
    """Return packet counts of our rules by comment."""
    result = {}
    for item in listing:
        rule = item.get("rule")
        if not rule or not str(rule.get("comment", "")).startswith(COMMENT_PREFIX):
            continue
        for expression in rule.get("expr", []):
            if "counter" in expression and isinstance(expression["counter"], dict):
                key = f"{rule['family']}/{rule['comment']}"
                result[key] = int(expression["counter"].get("packets", 0))
    return result


def describe_drift(expected: dict[str, Any], live: dict[str, Any]) -> dict[str, list[str]]:
    """Name the chains and rules that differ between two canonical rulesets."""

    def chain_names(form: dict[str, Any]) -> set[str]:
        return {f"{c['family']}/{c['name']}" for c in form["chains"]}

    def chains(form: dict[str, Any]) -> dict[str, Any]:
        return {f"{c['family']}/{c['name']}": c for c in form["chains"]}

    def rule_keys(form: dict[str, Any]) -> dict[str, Any]:
        return {f"{r['family']}/{r['chain']}/{r['comment']}": r["expr"] for r in form["rules"]}

    expected_rules, live_rules = rule_keys(expected), rule_keys(live)
    return {
        "missing_chains": sorted(chain_names(expected) - chain_names(live)),
        "unexpected_chains": sorted(chain_names(live) - chain_names(expected)),
        "changed_chains": sorted(
            key
            for key in chain_names(expected) & chain_names(live)
            if chains(expected)[key] != chains(live)[key]
        ),
        "missing_rules": sorted(set(expected_rules) - set(live_rules)),
        "unexpected_rules": sorted(set(live_rules) - set(expected_rules)),
        "changed_rules": sorted(
            key
            for key in set(expected_rules) & set(live_rules)
            if expected_rules[key] != live_rules[key]
        ),
    }
