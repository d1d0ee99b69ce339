"""Tests that the ruleset survives a round trip through the kernel's nftables unchanged.

Each test applies the real batch with libnftables under a table name of its own and deletes
both tables afterwards. The ruleset names a bridge that does not exist and a private subnet
that no interface of this host uses, so the tables match no traffic of other tests. Only the
loopback rules in `guard_prerouting` apply to the whole host, and every netguard adds those.
Needs root (CAP_NET_ADMIN) and Debian's python3-nftables, but no Docker, NATS or Redis.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from libs.common.messages import AgentNetworkPolicy
from services.netguard import firewall as firewall_module
from services.netguard.firewall import Firewall
from services.netguard.nft import FirewallError, Nft
from services.netguard.ruleset import (
    AGENT_SET,
    CHAINS,
    RulesetConfig,
    apply_batch,
    canonical,
    rules,
    ruleset_hash,
)

pytestmark = pytest.mark.integration

SUBNET = IPv4Network("10.213.47.0/24")
AGENT_ID = "ag-" + "0123456789abcdef" * 2
ETHER_TYPE = {"payload": {"protocol": "ether", "field": "type"}}


def _subnet_in_use() -> bool:
    output = subprocess.run(
        ["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    for link in json.loads(output):
        for address in link.get("addr_info", []):
            network = ipaddress.ip_interface(f"{address['local']}/{address['prefixlen']}").network
            if network.overlaps(SUBNET):
                return True
    return False


@pytest.fixture
def config() -> Iterator[RulesetConfig]:
    """Yield a config with a unique table name, then delete both tables."""
    if os.geteuid() != 0:
        pytest.skip("nftables needs root")
    pytest.importorskip("nftables")
    if _subnet_in_use():
        pytest.skip(f"{SUBNET} is in use on this host")
    table = f"ar_rstest_{uuid.uuid4().hex[:12]}"
    try:
        yield RulesetConfig(
            table=table,
            bridge="ar-rstest0",
            subnet=SUBNET,
            gateway=IPv4Address("10.213.47.1"),
            transparent_port=16001,
            dns_port=16053,
            explicit_port=16080,
        )
    finally:
        for family in ("inet", "bridge"):
            subprocess.run(
                ["nft", "delete", "table", family, table],
                capture_output=True,
                check=False,
                timeout=10,
            )


@pytest.fixture(autouse=True)
def quiet_route_localnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the checks independent of route_localnet sysctls that other programs set."""
    monkeypatch.setattr(firewall_module, "route_localnet_values", dict)


def listing(config: RulesetConfig) -> list[dict[str, Any]]:
    """Return the items of both tables as `nft -j list table` prints them."""
    items: list[dict[str, Any]] = []
    for family in ("inet", "bridge"):
        items += Nft().list_table(family, config.table) or []
    return items


def rule_handle(config: RulesetConfig, comment: str) -> int:
    """Return the kernel's handle of the inet rule with `comment`."""
    for item in Nft().list_table("inet", config.table) or []:
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            return int(rule["handle"])
    raise AssertionError(f"no rule {comment!r} in inet {config.table}")


def test_applied_batch_lists_same_rules(config: RulesetConfig) -> None:
    import nftables

    nft = nftables.Nftables()
    rc, _, error = nft.json_cmd(apply_batch(config, ["10.213.47.2"]))
    assert rc == 0, error

    form = canonical(listing(config))

    assert [r["comment"] for r in form["rules"]] == [r.comment for r in rules(config)]
    assert [(r["family"], r["chain"]) for r in form["rules"]] == [
        (r.family, r.chain) for r in rules(config)
    ]
    assert [(c["family"], c["name"], c["hook"], c["prio"]) for c in form["chains"]] == [
        (c.family, c.name, c.hook, c.priority) for c in CHAINS
    ]
    assert Nft().set_elements("inet", config.table, AGENT_SET) == ["10.213.47.2"]


def test_listed_expressions_equal_sent(config: RulesetConfig) -> None:
    Nft().run(apply_batch(config, []))

    listed = {(r["family"], r["comment"]): r["expr"] for r in canonical(listing(config))["rules"]}

    for rule in rules(config):
        sent = [e for e in rule.expr if "counter" not in e]
        if rule.family == "bridge":
            # nft lists no `ether type` match, because the ip or arp match implies it.
            sent = [e for e in sent if e.get("match", {}).get("left") != ETHER_TYPE]
        assert listed[(rule.family, rule.comment)] == sent, rule.comment


def test_listed_rules_keep_their_counters(config: RulesetConfig) -> None:
    Nft().run(apply_batch(config, []))

    for item in listing(config):
        if "rule" in item:
            counters = [e for e in item["rule"]["expr"] if "counter" in e]
            assert len(counters) == 1, item["rule"]["comment"]
            assert set(counters[0]["counter"]) == {"packets", "bytes"}


def test_hash_same_after_second_apply(config: RulesetConfig) -> None:
    Nft().run(apply_batch(config, []))
    first = ruleset_hash(canonical(listing(config)))

    Nft().run(apply_batch(config, ["10.213.47.2"]))

    assert ruleset_hash(canonical(listing(config))) == first


def test_firewall_verified_after_apply(config: RulesetConfig) -> None:
    firewall = Firewall(Nft(), config)

    digest = firewall.apply()
    result = firewall.check()

    assert result.verified is True, result.drift
    assert result.ruleset_hash == digest


def test_firewall_registers_agents(config: RulesetConfig) -> None:
    firewall = Firewall(Nft(), config)
    firewall.apply()

    firewall.add_agent(AgentNetworkPolicy(agent_id=AGENT_ID, address="10.213.47.2"))
    added = Nft().set_elements("inet", config.table, AGENT_SET)
    firewall.remove_agent("10.213.47.2")

    assert added == ["10.213.47.2"]
    assert Nft().set_elements("inet", config.table, AGENT_SET) == []
    assert firewall.check().verified is True


def test_firewall_detects_deleted_rule(config: RulesetConfig) -> None:
    firewall = Firewall(Nft(), config)
    firewall.apply()
    handle = rule_handle(config, "agent-runner:sandbox-egress-drop")
    subprocess.run(
        ["nft", "delete", "rule", "inet", config.table, "guard_forward", "handle", str(handle)],
        check=True,
        timeout=10,
    )

    result = firewall.check()

    assert result.verified is False
    assert result.drift == {
        "missing_rules": ["inet/guard_forward/agent-runner:sandbox-egress-drop"]
    }


def test_firewall_detects_changed_rule(config: RulesetConfig) -> None:
    firewall = Firewall(Nft(), config)
    firewall.apply()
    handle = rule_handle(config, "agent-runner:sandbox-egress-drop")
    subprocess.run(
        [
            "nft", "replace", "rule", "inet", config.table, "guard_forward", "handle", str(handle),
            "iifname", config.bridge, "counter", "accept",
            "comment", '"agent-runner:sandbox-egress-drop"',
        ],
        check=True,
        timeout=10,
    )  # fmt: skip

    result = firewall.check()

    assert result.verified is False
    assert result.drift == {
        "changed_rules": ["inet/guard_forward/agent-runner:sandbox-egress-drop"]
    }


def test_firewall_apply_repairs_drift(config: RulesetConfig) -> None:
    firewall = Firewall(Nft(), config)
    first = firewall.apply()
    subprocess.run(["nft", "delete", "table", "bridge", config.table], check=True, timeout=10)
    assert firewall.check().verified is False

    second = firewall.apply()

    assert second == first
    assert firewall.check().verified is True


def test_rejected_batch_keeps_old_tables(config: RulesetConfig) -> None:
    firewall = Firewall(Nft(), config)
    firewall.apply()
    batch = apply_batch(config, [])
    # A rule that names a set that does not exist makes the kernel reject the whole batch.
    batch["nftables"].append(
        {
            "add": {
                "rule": {
                    "family": "inet",
                    "table": config.table,
                    "chain": "guard_input",
                    "expr": [
                        {
                            "match": {
                                "op": "==",
                                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                "right": "@no_such_set",
                            }
                        },
                        {"drop": None},
                    ],
                }
            }
        }
    )

    with pytest.raises(FirewallError):
        Nft().run(batch)

    assert firewall.check().verified is True


def test_remove_deletes_both_tables(config: RulesetConfig) -> None:
    firewall = Firewall(Nft(), config)
    firewall.apply()

    firewall.remove()

    assert firewall.tables_present() == []
