"""Tests for the sandbox ruleset as nftables JSON: rules, batches, canonical form and drift."""

from __future__ import annotations

import copy
import dataclasses
import re
from ipaddress import IPv4Network
from typing import Any

import pytest

from services.netguard.ruleset import (
    AGENT_SET,
    CHAINS,
    COMMENT_PREFIX,
    Rule,
    RulesetConfig,
    apply_batch,
    canonical,
    counters,
    delete_batch,
    describe_drift,
    rules,
    ruleset_hash,
)
from tests.unit.netguard.fakes import FakeNft

AGENTS = ["10.77.0.3", "10.77.0.2"]
VERDICTS = {"drop", "accept", "redirect"}
IP_DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}
FROM_BRIDGE = {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "ar-unit0"}
REGISTERED = {
    "op": "==",
    "left": {"payload": {"protocol": "ip", "field": "saddr"}},
    "right": f"@{AGENT_SET}",
}
REDIRECTED = {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}
(REDIRECT_CHAIN,) = [chain.name for chain in CHAINS if chain.type == "nat"]


def rule_named(config: RulesetConfig, name: str) -> Rule:
    """Return the rule whose comment is COMMENT_PREFIX + `name`."""
    (found,) = [rule for rule in rules(config) if rule.comment == COMMENT_PREFIX + name]
    return found


def matches(rule: Rule) -> list[dict[str, Any]]:
    """Return the bodies of the rule's match expressions."""
    return [e["match"] for e in rule.expr if "match" in e]


def live_listing(config: RulesetConfig, agents: list[str]) -> list[dict[str, Any]]:
    """Return both tables as `nft -j list table` would list them after `apply_batch`."""
    nft = FakeNft()
    nft.run(apply_batch(config, agents))
    inet = nft.list_table("inet", config.table) or []
    bridge = nft.list_table("bridge", config.table) or []
    for item in inet:
        if "set" in item:
            item["set"]["elem"] = list(nft.elements)
    return inet + bridge


def commands(batch: dict[str, Any], verb: str, kind: str) -> list[dict[str, Any]]:
    """Return the specs of every `verb` `kind` command of a batch, in order."""
    return [c[verb][kind] for c in batch["nftables"] if verb in c and kind in c[verb]]


# rules()


def test_rule_comments_have_prefix(config: RulesetConfig) -> None:
    for rule in rules(config):
        assert rule.comment.startswith(COMMENT_PREFIX), rule


def test_rule_comments_unique(config: RulesetConfig) -> None:
    comments = [rule.comment for rule in rules(config)]

    assert len(comments) == len(set(comments))


def test_rule_comments_in_production_order(config: RulesetConfig) -> None:
    names = [rule.comment.removeprefix(COMMENT_PREFIX) for rule in rules(config)]

    assert names == [
        "loopback-from-outside-v4",
        "loopback-from-outside-v6",
        "redirect-http",
        "redirect-dns-udp",
        "redirect-dns-udp-gateway",
        "redirect-dns-tcp",
        "redirect-dns-tcp-gateway",
        "host-replies",
        "to-proxy-explicit",
        "to-proxy-redirected-tcp",
        "to-proxy-redirected-udp",
        "sandbox-to-host-drop",
        "sandbox-egress-drop",
        "to-sandbox-drop",
        "agent-to-agent-drop",
        "agent-to-agent-arp-drop",
    ]


def test_every_rule_ends_counter_then_verdict(config: RulesetConfig) -> None:
    for rule in rules(config):
        assert rule.expr[-2] == {"counter": None}, rule.comment
        assert set(rule.expr[-1]) <= VERDICTS, rule.comment
        assert [e for e in rule.expr[:-2] if "counter" in e] == [], rule.comment


def test_every_rule_in_a_known_chain(config: RulesetConfig) -> None:
    chains = {(chain.family, chain.name) for chain in CHAINS}

    for rule in rules(config):
        assert (rule.family, rule.chain) in chains, rule.comment


@pytest.mark.parametrize(
    ("name", "port_field"),
    [
        pytest.param("redirect-http", "transparent_port", id="http"),
        pytest.param("redirect-dns-udp", "dns_port", id="dns-udp"),
        pytest.param("redirect-dns-tcp", "dns_port", id="dns-tcp"),
        pytest.param("redirect-dns-udp-gateway", "dns_port", id="dns-udp-gateway"),
        pytest.param("redirect-dns-tcp-gateway", "dns_port", id="dns-tcp-gateway"),
    ],
)
def test_redirect_port_from_config(config: RulesetConfig, name: str, port_field: str) -> None:
    rule = rule_named(config, name)

    assert rule.expr[-1] == {"redirect": {"port": getattr(config, port_field)}}


def test_redirect_only_registered_agents(config: RulesetConfig) -> None:
    redirect_rules = [rule for rule in rules(config) if rule.chain == REDIRECT_CHAIN]

    assert len(redirect_rules) == 5
    for rule in redirect_rules:
        assert FROM_BRIDGE in matches(rule), rule.comment
        assert REGISTERED in matches(rule), rule.comment


def test_redirect_rules_skip_sandbox_subnet_but_the_gateway(config: RulesetConfig) -> None:
    not_to_sandbox = {
        "op": "!=",
        "left": IP_DADDR,
        "right": {"prefix": {"addr": "10.77.0.0", "len": 24}},
    }
    to_gateway = {"op": "==", "left": IP_DADDR, "right": str(config.gateway)}

    for rule in rules(config):
        if rule.chain != REDIRECT_CHAIN:
            continue
        if rule.comment.endswith("-gateway"):
            assert "dns" in rule.comment
            assert to_gateway in matches(rule), rule.comment
            assert not_to_sandbox not in matches(rule), rule.comment
        else:
            assert not_to_sandbox in matches(rule), rule.comment


def test_http_redirect_covers_80_and_443(config: RulesetConfig) -> None:
    tcp_dport = {"payload": {"protocol": "tcp", "field": "dport"}}

    ports = [
        m["right"] for m in matches(rule_named(config, "redirect-http")) if m["left"] == tcp_dport
    ]

    assert ports == [{"set": [80, 443]}]


def test_input_accepts_only_proxy_ports(config: RulesetConfig) -> None:
    accepts = [
        rule for rule in rules(config) if rule.chain == "guard_input" and "accept" in rule.expr[-1]
    ]
    ports: set[int] = set()

    for rule in accepts:
        if rule.comment == COMMENT_PREFIX + "host-replies":
            continue
        rule_matches = matches(rule)
        destinations = [m["right"] for m in rule_matches if m["left"] == IP_DADDR]
        assert destinations == ["10.77.0.1"], rule.comment
        for match in rule_matches:
            if match["left"].get("payload", {}).get("field") == "dport":
                right = match["right"]
                ports.update(right["set"] if isinstance(right, dict) else [right])

    assert ports == {16001, 16053, 16080}


def test_input_accept_rules(config: RulesetConfig) -> None:
    accepts = [
        rule.comment.removeprefix(COMMENT_PREFIX)
        for rule in rules(config)
        if rule.chain == "guard_input" and "accept" in rule.expr[-1]
    ]

    assert accepts == [
        "host-replies",
        "to-proxy-explicit",
        "to-proxy-redirected-tcp",
        "to-proxy-redirected-udp",
    ]


def test_explicit_port_accepted_without_redirect(config: RulesetConfig) -> None:
    rule_matches = matches(rule_named(config, "to-proxy-explicit"))

    assert FROM_BRIDGE in rule_matches
    assert REGISTERED in rule_matches
    assert REDIRECTED not in rule_matches
    assert {
        "op": "==",
        "left": {"payload": {"protocol": "tcp", "field": "dport"}},
        "right": 16080,
    } in rule_matches


@pytest.mark.parametrize(
    ("name", "protocol", "ports"),
    [
        pytest.param("to-proxy-redirected-tcp", "tcp", {"set": [16001, 16053]}, id="tcp"),
        pytest.param("to-proxy-redirected-udp", "udp", 16053, id="udp"),
    ],
)
def test_transparent_and_dns_ports_need_redirect(
    config: RulesetConfig, name: str, protocol: str, ports: Any
) -> None:
    rule_matches = matches(rule_named(config, name))

    assert REDIRECTED in rule_matches
    assert FROM_BRIDGE in rule_matches
    assert REGISTERED in rule_matches
    assert {
        "op": "==",
        "left": {"payload": {"protocol": protocol, "field": "dport"}},
        "right": ports,
    } in rule_matches


def test_host_replies_only_reply_direction(config: RulesetConfig) -> None:
    rule_matches = matches(rule_named(config, "host-replies"))

    assert {"op": "in", "left": {"ct": {"key": "state"}}, "right": "established"} in rule_matches
    assert {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"} in rule_matches


def test_input_ends_with_drop_from_bridge(config: RulesetConfig) -> None:
    input_rules = [rule for rule in rules(config) if rule.chain == "guard_input"]

    assert input_rules[-1].comment == COMMENT_PREFIX + "sandbox-to-host-drop"
    assert input_rules[-1].expr == (
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "ar-unit0"}},
        {"counter": None},
        {"drop": None},
    )


@pytest.mark.parametrize(
    ("name", "left"),
    [
        pytest.param(
            "agent-to-agent-drop", {"payload": {"protocol": "ip", "field": "saddr"}}, id="ip"
        ),
        pytest.param(
            "agent-to-agent-arp-drop",
            {"payload": {"protocol": "arp", "field": "saddr ip"}},
            id="arp",
        ),
    ],
)
def test_bridge_rule_matches_subnet(config: RulesetConfig, name: str, left: dict[str, Any]) -> None:
    rule = rule_named(config, name)

    assert rule.family == "bridge"
    assert {
        "op": "==",
        "left": left,
        "right": {"prefix": {"addr": "10.77.0.0", "len": 24}},
    } in matches(rule)
    assert rule.expr[-1] == {"drop": None}


def test_forward_drops_both_directions(config: RulesetConfig) -> None:
    egress = rule_named(config, "sandbox-egress-drop")
    ingress = rule_named(config, "to-sandbox-drop")

    assert matches(egress) == [
        {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "ar-unit0"}
    ]
    assert matches(ingress) == [
        {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "ar-unit0"}
    ]


@pytest.mark.parametrize(
    ("family", "type_", "hook", "priority"),
    [
        pytest.param("inet", "filter", "prerouting", -300, id="before-docker-dnat"),
        pytest.param("inet", "nat", "prerouting", -110, id="before-docker-nat"),
        pytest.param("inet", "filter", "input", -10, id="before-filter-input"),
        pytest.param("inet", "filter", "forward", -10, id="before-filter-forward"),
        pytest.param("bridge", "filter", "forward", -10, id="bridge-forward"),
    ],
)
def test_chain_priority(family: str, type_: str, hook: str, priority: int) -> None:
    (chain,) = [c for c in CHAINS if (c.family, c.type, c.hook) == (family, type_, hook)]

    assert chain.priority == priority


def test_rules_identical_for_equal_configs(config: RulesetConfig) -> None:
    assert rules(config) == rules(dataclasses.replace(config))


# apply_batch() and delete_batch()


def test_apply_batch_replaces_both_tables_first(config: RulesetConfig) -> None:
    batch = apply_batch(config, AGENTS)

    assert batch["nftables"][:6] == [
        {"add": {"table": {"family": "inet", "name": "ar_unit"}}},
        {"delete": {"table": {"family": "inet", "name": "ar_unit"}}},
        {"add": {"table": {"family": "inet", "name": "ar_unit"}}},
        {"add": {"table": {"family": "bridge", "name": "ar_unit"}}},
        {"delete": {"table": {"family": "bridge", "name": "ar_unit"}}},
        {"add": {"table": {"family": "bridge", "name": "ar_unit"}}},
    ]


def test_apply_batch_has_no_other_deletes(config: RulesetConfig) -> None:
    batch = apply_batch(config, AGENTS)

    deletes = [c for c in batch["nftables"] if "delete" in c]

    assert len(deletes) == 2


def test_apply_batch_adds_agents_sorted(config: RulesetConfig) -> None:
    batch = apply_batch(config, AGENTS)

    assert commands(batch, "add", "element") == [
        {
            "family": "inet",
            "table": "ar_unit",
            "name": AGENT_SET,
            "elem": ["10.77.0.2", "10.77.0.3"],
        }
    ]


def test_apply_batch_without_agents(config: RulesetConfig) -> None:
    batch = apply_batch(config, [])

    assert commands(batch, "add", "element") == []
    assert commands(batch, "add", "set") == [
        {"family": "inet", "table": "ar_unit", "name": AGENT_SET, "type": "ipv4_addr"}
    ]


def test_apply_batch_set_before_rules(config: RulesetConfig) -> None:
    kinds = [next(iter(c["add"])) for c in apply_batch(config, AGENTS)["nftables"] if "add" in c]

    assert kinds.index("set") < kinds.index("element") < kinds.index("chain")
    assert kinds.index("chain") < kinds.index("rule")


def test_apply_batch_adds_every_chain(config: RulesetConfig) -> None:
    chains = commands(apply_batch(config, AGENTS), "add", "chain")

    assert chains == [
        {
            "family": chain.family,
            "table": "ar_unit",
            "name": chain.name,
            "type": chain.type,
            "hook": chain.hook,
            "prio": chain.priority,
            "policy": "accept",
        }
        for chain in CHAINS
    ]


def test_apply_batch_adds_every_rule(config: RulesetConfig) -> None:
    added = commands(apply_batch(config, AGENTS), "add", "rule")

    assert [(r["family"], r["chain"], r["comment"]) for r in added] == [
        (rule.family, rule.chain, rule.comment) for rule in rules(config)
    ]
    assert [r["expr"] for r in added] == [list(rule.expr) for rule in rules(config)]


def test_apply_batch_names_only_config_table(config: RulesetConfig) -> None:
    other = dataclasses.replace(config, table="ar_other")
    batch = apply_batch(other, AGENTS)

    for command in batch["nftables"]:
        ((_, body),) = command.items()
        ((kind, spec),) = body.items()
        table = spec["name"] if kind == "table" else spec["table"]
        assert table == "ar_other", command


def test_delete_batch_removes_both_tables() -> None:
    assert delete_batch("ar_unit") == {
        "nftables": [
            {"add": {"table": {"family": "inet", "name": "ar_unit"}}},
            {"delete": {"table": {"family": "inet", "name": "ar_unit"}}},
            {"add": {"table": {"family": "bridge", "name": "ar_unit"}}},
            {"delete": {"table": {"family": "bridge", "name": "ar_unit"}}},
        ]
    }


# canonical() and ruleset_hash()


def test_canonical_drops_volatile_parts(config: RulesetConfig) -> None:
    listing = live_listing(config, AGENTS)

    form = canonical(listing)

    text = repr(form)
    assert "handle" not in text
    assert "counter" not in text
    assert "packets" not in text
    assert "10.77.0.2" not in text
    assert set(form) == {"chains", "rules"}


def test_canonical_keeps_chains_and_rules(config: RulesetConfig) -> None:
    form = canonical(live_listing(config, AGENTS))

    assert [(c["family"], c["name"], c["prio"]) for c in form["chains"]] == [
        (c.family, c.name, c.priority) for c in CHAINS
    ]
    assert [r["comment"] for r in form["rules"]] == [r.comment for r in rules(config)]
    assert form["rules"][0]["expr"] == [
        e for e in rule_named(config, "loopback-from-outside-v4").expr if "counter" not in e
    ]


def test_canonical_ignores_counter_values(config: RulesetConfig) -> None:
    listing = live_listing(config, AGENTS)
    counted = copy.deepcopy(listing)
    for item in counted:
        for expression in item.get("rule", {}).get("expr", []):
            if "counter" in expression:
                expression["counter"] = {"packets": 12, "bytes": 3400}

    assert canonical(counted) == canonical(listing)


def test_canonical_ignores_agent_set(config: RulesetConfig) -> None:
    assert canonical(live_listing(config, AGENTS)) == canonical(live_listing(config, []))


def test_hash_format(config: RulesetConfig) -> None:
    digest = ruleset_hash(canonical(live_listing(config, AGENTS)))

    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)


def test_hash_stable(config: RulesetConfig) -> None:
    first = ruleset_hash(canonical(live_listing(config, AGENTS)))
    second = ruleset_hash(canonical(live_listing(config, AGENTS)))

    assert first == second


def test_hash_ignores_key_order(config: RulesetConfig) -> None:
    form = canonical(live_listing(config, AGENTS))
    reordered = {
        "rules": form["rules"],
        "chains": [dict(reversed(c.items())) for c in form["chains"]],
    }

    assert ruleset_hash(reordered) == ruleset_hash(form)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"transparent_port": 16002}, id="redirect-port"),
        pytest.param({"bridge": "ar-unit1"}, id="bridge"),
        pytest.param({"subnet": IPv4Network("10.77.1.0/24")}, id="subnet"),
    ],
)
def test_hash_changes_with_rule(config: RulesetConfig, change: dict[str, Any]) -> None:
    changed = dataclasses.replace(config, **change)

    assert ruleset_hash(canonical(live_listing(changed, []))) != ruleset_hash(
        canonical(live_listing(config, []))
    )


def test_hash_changes_with_chain_priority(config: RulesetConfig) -> None:
    form = canonical(live_listing(config, []))
    changed = copy.deepcopy(form)
    changed["chains"][0]["prio"] = 0

    assert ruleset_hash(changed) != ruleset_hash(form)


# describe_drift()


def drift_of(config: RulesetConfig, change: Any) -> dict[str, list[str]]:
    """Return describe_drift between the expected form and a copy that `change` edited."""
    expected = canonical(live_listing(config, []))
    live = copy.deepcopy(expected)
    change(live)
    return describe_drift(expected, live)


def test_drift_none_when_equal(config: RulesetConfig) -> None:
    drift = drift_of(config, lambda live: None)

    assert drift == {
        "missing_chains": [],
        "unexpected_chains": [],
        "changed_chains": [],
        "missing_rules": [],
        "unexpected_rules": [],
        "changed_rules": [],
    }


def test_drift_changed_chain_priority(config: RulesetConfig) -> None:
    def lower_priority(live: dict[str, Any]) -> None:
        live["chains"][0]["prio"] = 0

    drift = drift_of(config, lower_priority)

    assert drift["changed_chains"] == ["inet/guard_prerouting"]
    assert drift["missing_chains"] == []


def test_drift_missing_rule(config: RulesetConfig) -> None:
    def remove_drop(live: dict[str, Any]) -> None:
        live["rules"] = [
            r for r in live["rules"] if r["comment"] != "agent-runner:sandbox-to-host-drop"
        ]

    drift = drift_of(config, remove_drop)

    assert drift["missing_rules"] == ["inet/guard_input/agent-runner:sandbox-to-host-drop"]
    assert drift["changed_rules"] == []
    assert drift["unexpected_rules"] == []


def test_drift_changed_rule(config: RulesetConfig) -> None:
    def change_port(live: dict[str, Any]) -> None:
        for rule in live["rules"]:
            if rule["comment"] == "agent-runner:redirect-http":
                rule["expr"][-1] = {"redirect": {"port": 8080}}

    drift = drift_of(config, change_port)

    assert drift["changed_rules"] == [f"inet/{REDIRECT_CHAIN}/agent-runner:redirect-http"]
    assert drift["missing_rules"] == []


def test_drift_unexpected_rule(config: RulesetConfig) -> None:
    def add_accept(live: dict[str, Any]) -> None:
        live["rules"].insert(
            0,
            {
                "family": "inet",
                "chain": "guard_forward",
                "comment": "agent-runner:let-me-out",
                "expr": [{"accept": None}],
            },
        )

    drift = drift_of(config, add_accept)

    assert drift["unexpected_rules"] == ["inet/guard_forward/agent-runner:let-me-out"]


def test_drift_missing_chain(config: RulesetConfig) -> None:
    def remove_bridge_table(live: dict[str, Any]) -> None:
        live["chains"] = [c for c in live["chains"] if c["family"] != "bridge"]
        live["rules"] = [r for r in live["rules"] if r["family"] != "bridge"]

    drift = drift_of(config, remove_bridge_table)

    assert drift["missing_chains"] == ["bridge/guard_forward"]
    assert drift["missing_rules"] == [
        "bridge/guard_forward/agent-runner:agent-to-agent-arp-drop",
        "bridge/guard_forward/agent-runner:agent-to-agent-drop",
    ]


def test_drift_unexpected_chain(config: RulesetConfig) -> None:
    def add_chain(live: dict[str, Any]) -> None:
        live["chains"].append({"family": "inet", "name": "sneaky", "type": "filter"})

    drift = drift_of(config, add_chain)

    assert drift["unexpected_chains"] == ["inet/sneaky"]


# counters()


def test_counters_by_family_and_comment(config: RulesetConfig) -> None:
    listing = live_listing(config, [])
    for item in listing:
        rule = item.get("rule")
        if rule and rule["comment"] == "agent-runner:sandbox-egress-drop":
            rule["expr"][-2] = {"counter": {"packets": 7, "bytes": 420}}

    counts = counters(listing)

    assert counts["inet/agent-runner:sandbox-egress-drop"] == 7
    assert counts["bridge/agent-runner:agent-to-agent-drop"] == 0
    assert len(counts) == len(rules(config))


def test_counters_skip_foreign_rules(config: RulesetConfig) -> None:
    listing = [
        {
            "rule": {
                "family": "inet",
                "chain": "input",
                "comment": "someone-else",
                "expr": [{"counter": {"packets": 5, "bytes": 1}}, {"accept": None}],
            }
        },
        {
            "rule": {
                "family": "inet",
                "chain": "input",
                "expr": [{"counter": {"packets": 5, "bytes": 1}}, {"accept": None}],
            }
        },
    ]

    assert counters(listing) == {}


def test_counters_skip_missing_values() -> None:
    listing = [
        {
            "rule": {
                "family": "inet",
                "chain": "guard_input",
                "comment": "agent-runner:x",
                "expr": [{"counter": None}, {"drop": None}],
            }
        }
    ]

    assert counters(listing) == {}
