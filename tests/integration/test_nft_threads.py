"""One libnftables context used from several threads at once, as netguard's workers do.

Without the lock in services/netguard/nft.py this crashed the process: a segmentation fault,
or libnftnl's "nf_tables kernel ABI is broken" followed by exit. The calls run in a child
process, so a crash fails the test instead of ending pytest.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from tests.support.stack import REPO_ROOT

pytestmark = pytest.mark.integration

THREADS = 4
ROUNDS = 400

CHILD = """
import sys
import threading

from services.netguard.nft import Nft

table, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
nft = Nft()
nft.run({"nftables": [
    {"add": {"table": {"family": "inet", "name": table}}},
    {"add": {"set": {"family": "inet", "table": table, "name": "agents", "type": "ipv4_addr"}}},
]})
errors = []


def work(worker):
    try:
        for step in range(rounds):
            address = f"198.51.100.{(worker * 50 + step) % 250 + 1}"
            element = {"family": "inet", "table": table, "name": "agents", "elem": [address]}
            nft.run({"nftables": [{"add": {"element": element}}]})
            nft.list_table("inet", table)
            nft.set_elements("inet", table, "agents")
    except Exception as exc:
        errors.append(repr(exc))


workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
for thread in workers:
    thread.start()
for thread in workers:
    thread.join()
print(f"errors={len(errors)} {errors[:1]}")
"""


def test_concurrent_calls_do_not_crash() -> None:
    table = f"ar_test_thr_{uuid.uuid4().hex[:8]}"
    try:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, table, str(THREADS), str(ROUNDS)],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=300,
            check=False,
        )
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)

    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.strip() == "errors=0 []"
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    assert table not in listed.stdout
