"""Apply, check and repair the sandbox firewall, and keep the set of registered agents.

The expected ruleset is what nftables listed right after netguard applied its own batch, in
canonical form (no handles, counters or set elements). A check compares the live tables with
it and the live `agents` set with the registry. Any difference is drift, which is repaired
by applying the whole batch again and reported with the names of the rules involved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from libs.common.messages import AgentNetworkPolicy
from services.netguard import ruleset
from services.netguard.nft import FirewallError, Nft, route_localnet_values
from services.netguard.ruleset import AGENT_SET, RulesetConfig

logger = logging.getLogger(__name__)


@dataclass
class CheckResult:
    """Outcome of one comparison of the live firewall with the expected one."""

    verified: bool
    ruleset_hash: str | None
    drift: dict[str, Any] = field(default_factory=dict)


class Firewall:
    """Our two nftables tables and the agents they let through to the proxy."""

    def __init__(self, nft: Nft, config: RulesetConfig) -> None:
        self._nft = nft
        self._config = config
        self._expected: dict[str, Any] | None = None
        self.agents: dict[str, AgentNetworkPolicy] = {}

    @property
    def expected_hash(self) -> str | None:
        """Hash of the ruleset as last applied, or None before the first apply."""
        return None if self._expected is None else ruleset.ruleset_hash(self._expected)

    def tables_present(self) -> list[str]:
        """Return which of our tables exist now, such as a crashed run left behind."""
        return [
            family
            for family in ("inet", "bridge")
            if self._nft.list_table(family, self._config.table) is not None
        ]

    def apply(self) -> str:
        """Replace both tables with the ruleset and the registered agents; return its hash.

        Raises FirewallError when nftables rejects the batch or lists something other than
        the rules it was given, so the caller can fail closed.
        """
        self._nft.run(ruleset.apply_batch(self._config, sorted(self.agents)))
        listed = self._listing()
        comments = [rule["comment"] for rule in listed["rules"]]
        wanted = [rule.comment for rule in ruleset.rules(self._config)]
        if sorted(comments) != sorted(wanted):
            raise FirewallError(
                f"the applied tables hold rules {comments}, expected {wanted}; another program "
                "changed them during the apply"
            )
        # NOTE: only rule names are compared with what was sent; that nft lists each rule's
        # expressions as sent is shown by tests/integration/test_ruleset_nft.py, not here.
        self._expected = listed
        digest = ruleset.ruleset_hash(listed)
        logger.info("applied firewall %s with %d agents", digest, len(self.agents))
        return digest

    def check(self) -> CheckResult:
        """Compare the live firewall with the expected one; never changes anything."""
        if self._expected is None:
            return CheckResult(verified=False, ruleset_hash=None, drift={"never_applied": True})
        try:
            live = self._listing()
            elements = sorted(self._nft.set_elements("inet", self._config.table, AGENT_SET))
        except FirewallError as exc:
            return CheckResult(verified=False, ruleset_hash=None, drift={"error": str(exc)})
        drift: dict[str, Any] = {
            key: value
            for key, value in ruleset.describe_drift(self._expected, live).items()
            if value
        }
        if live != self._expected and not drift:
            drift["reordered"] = True
        if elements != sorted(self.agents):
            drift["agent_set"] = {"live": elements, "expected": sorted(self.agents)}
        localnet = {name: value for name, value in route_localnet_values().items() if value != "0"}
        if localnet:
            drift["route_localnet"] = localnet
        return CheckResult(verified=not drift, ruleset_hash=ruleset.ruleset_hash(live), drift=drift)

    def counters(self) -> dict[str, int]:
        """Return packet counts of our rules; they restart at zero after every apply."""
        counts: dict[str, int] = {}
        for family in ("inet", "bridge"):
            listing = self._nft.list_table(family, self._config.table)
            counts.update(ruleset.counters(listing or []))
        return counts

    def add_agent(self, policy: AgentNetworkPolicy) -> None:
        """Let `policy.address` reach the proxy; raises FirewallError if nftables refuses."""
        self._nft.run({"nftables": [{"add": {"element": self._element(policy.address)}}]})
        self.agents[policy.address] = policy

    def remove_agent(self, address: str) -> None:
        """Stop letting `address` reach the proxy; unknown addresses are ignored."""
        if self.agents.pop(address, None) is None:
            return
        self._nft.run({"nftables": [{"delete": {"element": self._element(address)}}]})

    def remove(self) -> None:
        """Delete both tables; used at clean shutdown."""
        self._nft.run(ruleset.delete_batch(self._config.table))
        self._expected = None

    def _element(self, address: str) -> dict[str, Any]:
        return {"family": "inet", "table": self._config.table, "name": AGENT_SET, "elem": [address]}

    def _listing(self) -> dict[str, Any]:
        items: list[dict[str, Any]] = []
        for family in ("inet", "bridge"):
            listing = self._nft.list_table(family, self._config.table)
            if listing is None:
                listing = []
            items.extend(listing)
        return ruleset.canonical(items)
