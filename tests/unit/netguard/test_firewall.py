"""Tests for Firewall: apply, drift checks and agent registration, against a fake nftables."""

from __future__ import annotations

from typing import Any

import pytest

from libs.common.messages import AgentNetworkPolicy
from services.netguard import firewall as firewall_module
from services.netguard.firewall import Firewall
from services.netguard.nft import FirewallError
from services.netguard.ruleset import (
    RulesetConfig,
    apply_batch,
    canonical,
    delete_batch,
    ruleset_hash,
)
from tests.unit.netguard.fakes import FakeNft

AGENT_ID = "ag-" + "0123456789abcdef" * 2
OTHER_AGENT_ID = "ag-" + "fedcba9876543210" * 2
EGRESS_DROP = "inet/guard_forward/agent-runner:sandbox-egress-drop"


@pytest.fixture(autouse=True)
def quiet_route_localnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the checks independent of this host's route_localnet sysctls."""
    monkeypatch.setattr(firewall_module, "route_localnet_values", lambda: {"all": "0", "lo": "0"})


@pytest.fixture
def nft() -> FakeNft:
    return FakeNft()


@pytest.fixture
def firewall(nft: FakeNft, config: RulesetConfig) -> Firewall:
    return Firewall(nft, config)  # type: ignore[arg-type]


@pytest.fixture
def applied(firewall: Firewall) -> Firewall:
    firewall.apply()
    return firewall


def policy(address: str, agent_id: str = AGENT_ID) -> AgentNetworkPolicy:
    return AgentNetworkPolicy(agent_id=agent_id, address=address)


def live_rule(nft: FakeNft, config: RulesetConfig, comment: str) -> dict[str, Any]:
    (rule,) = [r for r in nft.rules("inet", config.table) if r["comment"] == comment]
    return rule


# apply()


def test_apply_sends_apply_batch(firewall: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    firewall.agents = {"10.77.0.3": policy("10.77.0.3"), "10.77.0.2": policy("10.77.0.2")}

    firewall.apply()

    assert nft.batches == [apply_batch(config, ["10.77.0.2", "10.77.0.3"])]


def test_apply_returns_hash_of_listing(firewall: Firewall) -> None:
    digest = firewall.apply()

    assert digest.startswith("sha256:")
    assert firewall.expected_hash == digest


def test_expected_hash_none_before_apply(firewall: Firewall) -> None:
    assert firewall.expected_hash is None


def test_apply_fails_when_listing_lacks_rule(config: RulesetConfig) -> None:
    nft = FakeNft(omit_comments=frozenset({"agent-runner:sandbox-egress-drop"}))
    firewall = Firewall(nft, config)  # type: ignore[arg-type]

    with pytest.raises(FirewallError) as error:
        firewall.apply()

    assert "agent-runner:sandbox-egress-drop" in str(error.value)
    assert firewall.expected_hash is None


def test_check_unverified_after_failed_apply(config: RulesetConfig) -> None:
    nft = FakeNft(omit_comments=frozenset({"agent-runner:sandbox-egress-drop"}))
    firewall = Firewall(nft, config)  # type: ignore[arg-type]
    with pytest.raises(FirewallError):
        firewall.apply()

    result = firewall.check()

    assert result.verified is False
    assert result.drift == {"never_applied": True}


def test_apply_fails_when_nft_rejects(firewall: Firewall, nft: FakeNft) -> None:
    nft.reject_next = "Error: Could not process rule"

    with pytest.raises(FirewallError) as error:
        firewall.apply()

    assert "Could not process rule" in str(error.value)
    assert firewall.expected_hash is None


# check()


def test_check_before_apply_unverified(firewall: Firewall) -> None:
    result = firewall.check()

    assert result.verified is False
    assert result.ruleset_hash is None
    assert result.drift == {"never_applied": True}


def test_check_after_apply_verified(applied: Firewall) -> None:
    result = applied.check()

    assert result.verified is True
    assert result.drift == {}
    assert result.ruleset_hash == applied.expected_hash


def test_check_ignores_counter_values(
    applied: Firewall, nft: FakeNft, config: RulesetConfig
) -> None:
    rule = live_rule(nft, config, "agent-runner:sandbox-to-host-drop")
    rule["expr"][-2] = {"counter": {"packets": 99, "bytes": 5000}}

    assert applied.check().verified is True


def test_check_reports_missing_rule(applied: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    table = nft.tables[("inet", config.table)]
    table[:] = [
        item
        for item in table
        if item.get("rule", {}).get("comment") != "agent-runner:sandbox-egress-drop"
    ]

    result = applied.check()

    assert result.verified is False
    assert result.drift == {
        "missing_rules": ["inet/guard_forward/agent-runner:sandbox-egress-drop"]
    }
    assert result.ruleset_hash != applied.expected_hash


def test_check_reports_changed_rule(applied: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    rule = live_rule(nft, config, "agent-runner:sandbox-egress-drop")
    rule["expr"][-1] = {"accept": None}

    result = applied.check()

    assert result.verified is False
    assert result.drift == {
        "changed_rules": ["inet/guard_forward/agent-runner:sandbox-egress-drop"]
    }


def test_check_reports_missing_table(
    applied: Firewall, nft: FakeNft, config: RulesetConfig
) -> None:
    del nft.tables[("bridge", config.table)]

    result = applied.check()

    assert result.verified is False
    assert result.drift["missing_chains"] == ["bridge/guard_forward"]
    assert len(result.drift["missing_rules"]) == 2


def test_check_reports_reordered_rules(
    applied: Firewall, nft: FakeNft, config: RulesetConfig
) -> None:
    table = nft.tables[("inet", config.table)]
    positions = [index for index, item in enumerate(table) if "rule" in item]
    first, last = positions[0], positions[-1]
    table[first], table[last] = table[last], table[first]

    result = applied.check()

    assert result.verified is False
    assert result.drift == {"reordered": True}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("prio", 10, id="priority-after-docker"),
        pytest.param("policy", "drop", id="policy"),
        pytest.param("hook", "output", id="hook"),
    ],
)
def test_check_reports_changed_chain(
    applied: Firewall, nft: FakeNft, config: RulesetConfig, key: str, value: Any
) -> None:
    for item in nft.tables[("inet", config.table)]:
        if item.get("chain", {}).get("name") == "guard_input":
            item["chain"][key] = value

    result = applied.check()

    # The drift is named "reordered", because describe_drift compares chain names only.
    assert result.verified is False
    assert result.drift != {}
    assert result.ruleset_hash != applied.expected_hash


def test_check_reports_unregistered_element(applied: Firewall, nft: FakeNft) -> None:
    nft.elements = ["10.77.0.9"]

    result = applied.check()

    assert result.verified is False
    assert result.drift == {"agent_set": {"live": ["10.77.0.9"], "expected": []}}


def test_check_reports_missing_element(applied: Firewall, nft: FakeNft) -> None:
    applied.add_agent(policy("10.77.0.2"))
    nft.elements = []

    result = applied.check()

    assert result.drift == {"agent_set": {"live": [], "expected": ["10.77.0.2"]}}


def test_check_reports_route_localnet(applied: Firewall, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        firewall_module, "route_localnet_values", lambda: {"all": "0", "ar-unit0": "1"}
    )

    result = applied.check()

    assert result.verified is False
    assert result.drift == {"route_localnet": {"ar-unit0": "1"}}


def test_check_reports_listing_error(applied: Firewall, nft: FakeNft) -> None:
    nft.list_error = "Operation not permitted"

    result = applied.check()

    assert result.verified is False
    assert result.ruleset_hash is None
    assert "Operation not permitted" in result.drift["error"]


def test_check_changes_nothing(applied: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    live_rule(nft, config, "agent-runner:sandbox-egress-drop")["expr"][-1] = {"accept": None}
    batches = len(nft.batches)

    applied.check()

    assert len(nft.batches) == batches


def test_apply_repairs_drift(applied: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    applied.add_agent(policy("10.77.0.2"))
    live_rule(nft, config, "agent-runner:sandbox-egress-drop")["expr"][-1] = {"accept": None}
    nft.elements = []

    applied.apply()

    assert applied.check().verified is True
    assert nft.elements == ["10.77.0.2"]


def test_expected_hash_from_listing(applied: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    listing = (nft.list_table("inet", config.table) or []) + (
        nft.list_table("bridge", config.table) or []
    )

    assert applied.check().ruleset_hash == ruleset_hash(canonical(listing))


# add_agent(), remove_agent(), remove(), counters()


def test_add_agent_adds_set_element(applied: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    applied.add_agent(policy("10.77.0.2"))

    assert nft.batches[-1] == {
        "nftables": [
            {
                "add": {
                    "element": {
                        "family": "inet",
                        "table": config.table,
                        "name": "agents",
                        "elem": ["10.77.0.2"],
                    }
                }
            }
        ]
    }
    assert applied.agents == {"10.77.0.2": policy("10.77.0.2")}
    assert applied.check().verified is True


def test_add_agent_rejected_leaves_registry(applied: Firewall, nft: FakeNft) -> None:
    nft.reject_next = "Error: Could not process rule"

    with pytest.raises(FirewallError):
        applied.add_agent(policy("10.77.0.2"))

    assert applied.agents == {}
    assert applied.check().verified is True


def test_add_agent_replaces_policy_of_address(applied: Firewall) -> None:
    applied.add_agent(policy("10.77.0.2"))

    applied.add_agent(policy("10.77.0.2", OTHER_AGENT_ID))

    assert applied.agents["10.77.0.2"].agent_id == OTHER_AGENT_ID
    assert applied.check().verified is True


def test_remove_agent_deletes_set_element(
    applied: Firewall, nft: FakeNft, config: RulesetConfig
) -> None:
    applied.add_agent(policy("10.77.0.2"))
    applied.add_agent(policy("10.77.0.3", OTHER_AGENT_ID))

    applied.remove_agent("10.77.0.2")

    assert nft.batches[-1] == {
        "nftables": [
            {
                "delete": {
                    "element": {
                        "family": "inet",
                        "table": config.table,
                        "name": "agents",
                        "elem": ["10.77.0.2"],
                    }
                }
            }
        ]
    }
    assert list(applied.agents) == ["10.77.0.3"]
    assert nft.elements == ["10.77.0.3"]
    assert applied.check().verified is True


def test_remove_unknown_agent_sends_nothing(applied: Firewall, nft: FakeNft) -> None:
    batches = len(nft.batches)

    applied.remove_agent("10.77.0.2")

    assert len(nft.batches) == batches


def test_apply_keeps_registered_agents(applied: Firewall, nft: FakeNft) -> None:
    applied.add_agent(policy("10.77.0.2"))

    applied.apply()

    assert nft.elements == ["10.77.0.2"]


def test_remove_deletes_tables(applied: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    applied.remove()

    assert nft.batches[-1] == delete_batch(config.table)
    assert nft.tables == {}
    assert applied.expected_hash is None
    assert applied.check().drift == {"never_applied": True}


def test_tables_present(firewall: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    assert firewall.tables_present() == []

    firewall.apply()
    del nft.tables[("inet", config.table)]

    assert firewall.tables_present() == ["bridge"]


def test_counters_of_both_tables(applied: Firewall, nft: FakeNft, config: RulesetConfig) -> None:
    live_rule(nft, config, "agent-runner:sandbox-to-host-drop")["expr"][-2] = {
        "counter": {"packets": 4, "bytes": 240}
    }

    counts = applied.counters()

    assert counts["inet/agent-runner:sandbox-to-host-drop"] == 4
    assert counts["bridge/agent-runner:agent-to-agent-drop"] == 0


def test_counters_empty_without_tables(firewall: Firewall) -> None:
    assert firewall.counters() == {}
