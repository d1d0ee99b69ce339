"""A stand-in for netguard's Nft adapter, for tests without root or the nftables library.

FakeNft keeps tables in memory in the shape `nft -j list table` prints: handles on every
item, counters with packet and byte counts, and set elements inside the set. Applying a
batch interprets the same commands the real adapter sends (add or delete of tables, sets,
elements, chains and rules), so the Firewall under test reads back what it wrote. Tests
change `tables` or `elements` directly to imitate another program changing the live ruleset.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from services.netguard.nft import FirewallError

Items = list[dict[str, Any]]


class FakeNft:
    """Record every batch and keep the resulting tables and `agents` set in memory."""

    def __init__(self, *, omit_comments: frozenset[str] = frozenset()) -> None:
        # Rules with these comments are left out when a batch adds them, as if another program
        # deleted them between the apply and the listing.
        self.omit_comments = omit_comments
        self.batches: list[dict[str, Any]] = []
        self.tables: dict[tuple[str, str], Items] = {}
        self.elements: list[str] = []
        self.reject_next: str | None = None
        self.list_error: str | None = None
        self._handles = itertools.count(1)

    def run(self, batch: dict[str, Any]) -> None:
        """Apply `batch`; raises FirewallError once if `reject_next` is set, changing nothing."""
        self.batches.append(copy.deepcopy(batch))
        if self.reject_next is not None:
            message, self.reject_next = self.reject_next, None
            raise FirewallError(f"nftables rejected the batch: {message}")
        for command in batch["nftables"]:
            ((verb, body),) = command.items()
            ((kind, spec),) = body.items()
            getattr(self, f"_{verb}_{kind}")(spec)

    def list_table(self, family: str, table: str) -> Items | None:
        """Return a copy of the table's items, or None when it does not exist."""
        if self.list_error is not None:
            raise FirewallError(f"cannot list table {family} {table}: {self.list_error}")
        items = self.tables.get((family, table))
        return None if items is None else copy.deepcopy(items)

    def set_elements(self, family: str, table: str, name: str) -> list[str]:
        """Return the elements of the `agents` set."""
        if (family, table) not in self.tables:
            raise FirewallError(f"cannot list set {family} {table} {name}: No such file")
        return list(self.elements)

    def rules(self, family: str, table: str) -> Items:
        """Return the live rule bodies of a table, for tests to change in place."""
        return [item["rule"] for item in self.tables[(family, table)] if "rule" in item]

    def _add_table(self, spec: dict[str, Any]) -> None:
        key = (spec["family"], spec["name"])
        if key not in self.tables:
            self.tables[key] = [{"table": {**spec, "handle": next(self._handles)}}]

    def _delete_table(self, spec: dict[str, Any]) -> None:
        del self.tables[(spec["family"], spec["name"])]
        if spec["family"] == "inet":
            self.elements = []

    def _add_set(self, spec: dict[str, Any]) -> None:
        self.tables[(spec["family"], spec["table"])].append(
            {"set": {**spec, "handle": next(self._handles)}}
        )

    def _add_element(self, spec: dict[str, Any]) -> None:
        self.elements = sorted(set(self.elements) | set(spec["elem"]))

    def _delete_element(self, spec: dict[str, Any]) -> None:
        self.elements = sorted(set(self.elements) - set(spec["elem"]))

    def _add_chain(self, spec: dict[str, Any]) -> None:
        self.tables[(spec["family"], spec["table"])].append(
            {"chain": {**spec, "handle": next(self._handles)}}
        )

    def _add_rule(self, spec: dict[str, Any]) -> None:
        if spec["comment"] in self.omit_comments:
            return
        expr = [
            {"counter": {"packets": 0, "bytes": 0}} if "counter" in e else e for e in spec["expr"]
        ]
        self.tables[(spec["family"], spec["table"])].append(
            {"rule": {**spec, "expr": expr, "handle": next(self._handles)}}
        )
