"""Read netguard's rule counters and agent set with the `nft` command, as an operator would.

Every netguard rule has a counter and a comment starting with `agent-runner:`. Tests key rules
as "<family>/<comment>", read the counters before and after a probe, and check which rules
counted its packets.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

FAMILIES = ("inet", "bridge")
COMMENT_PREFIX = "agent-runner:"
AGENT_SET = "agents"
NFT_TIMEOUT_SECONDS = 30


class CountersReset(AssertionError):
    """A counter went down between two readings: netguard replaced its tables meanwhile."""


def list_table(family: str, table: str) -> list[dict[str, Any]] | None:
    """Return the items of `nft -j list table`, or None when the table does not exist."""
    result = subprocess.run(
        ["nft", "-j", "list", "table", family, table],
        capture_output=True,
        text=True,
        check=False,
        timeout=NFT_TIMEOUT_SECONDS,
    )
    if result.returncode != 0:
        if "No such file or directory" in result.stderr:
            return None
        raise RuntimeError(f"nft list table {family} {table} failed: {result.stderr.strip()}")
    items: list[dict[str, Any]] = json.loads(result.stdout)["nftables"]
    return items


def rule_counters(table: str) -> dict[str, int]:
    """Return the packet counts of our rules in both tables, keyed "<family>/<comment>".

    Raises AssertionError when a table is missing, since then no rule can have counted.
    """
    counts: dict[str, int] = {}
    for family in FAMILIES:
        items = list_table(family, table)
        assert items is not None, f"table {family} {table} does not exist"
        for item in items:
            rule = item.get("rule")
            if rule is None or not str(rule.get("comment", "")).startswith(COMMENT_PREFIX):
                continue
            for expression in rule.get("expr", []):
                if isinstance(expression.get("counter"), dict):
                    key = f"{family}/{rule['comment']}"
                    counts[key] = counts.get(key, 0) + int(expression["counter"]["packets"])
    return counts


def counter_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Return how many packets each rule counted between two readings, leaving out zeros.

    Raises CountersReset when a counter went down, because then the deltas would be wrong.
    """
    went_down = {
        key: (before[key], after.get(key)) for key in before if after.get(key, 0) < before[key]
    }
    if went_down:
        raise CountersReset(
            f"counters went down (before, after): {went_down}. Netguard replaced its tables "
            "during the probe, for example to repair drift, so run the probe again"
        )
    deltas = {key: after[key] - before.get(key, 0) for key in after}
    return {key: delta for key, delta in deltas.items() if delta}


def agent_set(table: str) -> list[str]:
    """Return the addresses in netguard's `agents` set of the inet table."""
    result = subprocess.run(
        ["nft", "-j", "list", "set", "inet", table, AGENT_SET],
        capture_output=True,
        text=True,
        check=True,
        timeout=NFT_TIMEOUT_SECONDS,
    )
    for item in json.loads(result.stdout)["nftables"]:
        if "set" in item:
            return [str(element) for element in item["set"].get("elem", [])]
    return []
