"""nftables access through libnftables' JSON API (Debian's python3-nftables).

Errors of the library become FirewallError here, naming the command and the kernel's
message, because netguard must fail closed and log why.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class FirewallError(Exception):
    """An nftables command failed; the firewall may not be in place."""


class Nft:
    """A libnftables context with JSON input and output, safe to call from several threads.

    One libnftables context is not thread-safe: netguard calls it from asyncio's worker
    threads (the periodic check, counters, agent registration), and two calls at once
    crashed the process with a segmentation fault or a failed libnftnl assertion. Every call
    therefore holds one lock.
    """

    def __init__(self) -> None:
        try:
            import nftables  # noqa: PLC0415 - Debian package, imported only where used
        except ImportError as exc:
            raise FirewallError(
                "cannot import nftables; install Debian's python3-nftables and create the "
                "venv with --system-site-packages (scripts/deps.sh does both)"
            ) from exc
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        self._lock = threading.Lock()

    def _cmd(self, command: str) -> tuple[int, str, str]:
        with self._lock:
            rc, output, error = self._nft.cmd(command)
        return int(rc), str(output), str(error)

    def run(self, batch: dict[str, Any]) -> None:
        """Apply a JSON batch as one transaction; raises FirewallError when it is rejected."""
        with self._lock:
            rc, _, error = self._nft.json_cmd(batch)
        if rc != 0:
            raise FirewallError(f"nftables rejected the batch: {error.strip() or rc}")

    def list_table(self, family: str, table: str) -> list[dict[str, Any]] | None:
        """Return the JSON items of a table, or None when it does not exist."""
        rc, output, error = self._cmd(f"list table {family} {table}")
        if rc != 0:
            if "No such file or directory" in error:
                return None
            raise FirewallError(f"cannot list table {family} {table}: {error.strip()}")
        items: list[dict[str, Any]] = json.loads(output)["nftables"]
        return items

    def set_elements(self, family: str, table: str, name: str) -> list[str]:
        """Return the elements of a set as strings."""
        rc, output, error = self._cmd(f"list set {family} {table} {name}")
        if rc != 0:
            raise FirewallError(f"cannot list set {family} {table} {name}: {error.strip()}")
        for item in json.loads(output)["nftables"]:
            if "set" in item:
                return [str(element) for element in item["set"].get("elem", [])]
        return []


def route_localnet_values(conf: Path = Path("/proc/sys/net/ipv4/conf")) -> dict[str, str]:
    """Return `net.ipv4.conf.*.route_localnet` for every interface that has it.

    An interface removed between listing and reading (an agent's veth when its container
    stops) is left out: it no longer routes anything.
    """
    values = {}
    for path in sorted(conf.glob("*/route_localnet")):
        try:
            values[path.parent.name] = path.read_text().strip()
        except FileNotFoundError:
            continue
    return values
