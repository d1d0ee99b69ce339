"""Netguard against real nftables: apply, registration, drift repair, shutdown and failure."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from services.netguard.ruleset import RulesetConfig, rules
from tests.integration.conftest import Tarball, trusted_sources
from tests.support.stack import (
    VENV_BIN,
    FileServer,
    Stack,
    free_port,
    running_stack,
    wait_for_state,
)

pytestmark = pytest.mark.integration

SUBNET = "172.29.5.0/24"
METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, served: FileServer) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("netguard"),
        network="agent-runner-ng",
        subnet=SUBNET,
        bridge="ar-ng0",
        netguard_args=[f"--metrics-port={METRICS_PORT}"],
        supervisor_args=[
            "--agent-start-timeout=10",
            "--agent-stop-grace=2",
            *trusted_sources(served.url("")),
        ],
    ) as stack:
        yield stack


@pytest.fixture
def client(guarded: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.api_url, headers=guarded.headers, timeout=60) as api:
        yield api


def table(family: str, name: str) -> list[dict[str, Any]] | None:
    result = subprocess.run(
        ["nft", "-j", "-a", "list", "table", family, name],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    items: list[dict[str, Any]] = json.loads(result.stdout)["nftables"]
    return items


def comments(stack: Stack) -> set[str]:
    found = set()
    for family in ("inet", "bridge"):
        for item in table(family, stack.firewall_table) or []:
            if "rule" in item:
                found.add(f"{family}/{item['rule']['comment']}")
    return found


def expected_comments(stack: Stack) -> set[str]:
    config = RulesetConfig(
        table=stack.firewall_table,
        bridge=stack.bridge,
        subnet=IPv4Network(stack.subnet),
        gateway=IPv4Address("172.29.5.1"),
        transparent_port=15001,
        dns_port=15053,
        explicit_port=15080,
    )
    return {f"{rule.family}/{rule.comment}" for rule in rules(config)}


def agent_set(stack: Stack) -> list[str]:
    for item in table("inet", stack.firewall_table) or []:
        if "set" in item:
            return [str(element) for element in item["set"].get("elem", [])]
    return []


def rule_handle(stack: Stack, chain: str, comment: str) -> int:
    for item in table("inet", stack.firewall_table) or []:
        rule = item.get("rule")
        if rule and rule["chain"] == chain and rule.get("comment") == comment:
            return int(rule["handle"])
    raise AssertionError(f"rule {comment!r} not found in {chain}")


def wait_until(condition: Any, *, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.2)


def start_agent(client: httpx.Client, tarball: Tarball) -> dict[str, Any]:
    response = client.post(
        "/v1/agents",
        params={"wait": "true"},
        json={"image_url": tarball.url, "image_digest": tarball.digest},
    )
    assert response.status_code == 202, response.text
    agent: dict[str, Any] = response.json()
    return agent


def events_of_type(stack: Stack, event_type: str) -> list[dict[str, Any]]:
    return [event for event in stack.audit_events() if event["type"] == event_type]


def test_tables_hold_every_rule(guarded: Stack) -> None:
    assert comments(guarded) == expected_comments(guarded)


def test_agent_address_registered_and_removed(
    guarded: Stack,
    client: httpx.Client,
    echo_tarball: Tarball,
    docker_client: docker.DockerClient,
) -> None:
    agent = start_agent(client, echo_tarball)
    assert agent["state"] == "ready", agent
    container = docker_client.containers.get(agent["container_id"])
    address = container.attrs["NetworkSettings"]["Networks"][guarded.network]["IPAddress"]

    assert address in agent_set(guarded)
    client.delete(f"/v1/agents/{agent['agent_id']}")
    assert address not in agent_set(guarded)
    types = [event["type"] for event in guarded.audit_events(agent["agent_id"])]
    assert "firewall.policy_added" in types
    assert "firewall.policy_removed" in types


def test_deleted_rule_restored(guarded: Stack) -> None:
    comment = "agent-runner:sandbox-egress-drop"
    handle = rule_handle(guarded, "guard_forward", comment)
    subprocess.run(
        [
            "nft",
            "delete",
            "rule",
            "inet",
            guarded.firewall_table,
            "guard_forward",
            "handle",
            str(handle),
        ],
        check=True,
    )
    assert f"inet/{comment}" not in comments(guarded)

    wait_until(
        lambda: comments(guarded) == expected_comments(guarded),
        timeout=5,
        message="deleted rule was not restored within 5 s",
    )
    drifts = events_of_type(guarded, "firewall.drift")
    assert any(
        f"inet/guard_forward/{comment}" in event["details"]["drift"].get("missing_rules", [])
        for event in drifts
    ), drifts


def test_flushed_chain_restored(guarded: Stack) -> None:
    subprocess.run(
        ["nft", "flush", "chain", "inet", guarded.firewall_table, "guard_input"], check=True
    )
    assert "inet/agent-runner:sandbox-to-host-drop" not in comments(guarded)

    wait_until(
        lambda: comments(guarded) == expected_comments(guarded),
        timeout=5,
        message="flushed chain was not restored within 5 s",
    )


def test_changed_rule_restored(guarded: Stack) -> None:
    handle = rule_handle(guarded, "guard_input", "agent-runner:sandbox-to-host-drop")
    subprocess.run(
        [
            "nft",
            "replace",
            "rule",
            "inet",
            guarded.firewall_table,
            "guard_input",
            "handle",
            str(handle),
            "iifname",
            "ar-ng0",
            "counter",
            "accept",
            "comment",
            '"agent-runner:sandbox-to-host-drop"',
        ],
        check=True,
    )
    wait_until(
        lambda: any(
            "inet/guard_input/agent-runner:sandbox-to-host-drop"
            in event["details"]["drift"].get("changed_rules", [])
            for event in events_of_type(guarded, "firewall.drift")
        ),
        timeout=10,
        message="changed rule was not reported as drift",
    )
    listing = subprocess.run(
        ["nft", "list", "chain", "inet", guarded.firewall_table, "guard_input"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'counter packets 0 bytes 0 drop comment "agent-runner:sandbox-to-host-drop"' in (listing)


def test_clean_stop_removes_tables_and_blocks_starts(
    guarded: Stack, client: httpx.Client, echo_tarball: Tarball
) -> None:
    assert guarded.stop_service("netguard") == 0
    assert table("inet", guarded.firewall_table) is None
    assert table("bridge", guarded.firewall_table) is None
    time.sleep(4)  # the last state goes stale after three 1 s check intervals
    readiness = client.get("/readyz")
    assert readiness.status_code == 503
    assert readiness.json()["firewall"][guarded.host_id] in {"stale", "unverified"}

    try:
        refused = start_agent(client, echo_tarball)
        assert refused["state"] == "failed"
        assert refused["failure_reason"] == "firewall_not_verified"
        assert refused["container_id"] is None
    finally:
        guarded.start_netguard()
    wait_until(
        lambda: comments(guarded) == expected_comments(guarded),
        timeout=10,
        message="netguard did not apply its tables again",
    )
    time.sleep(1.5)  # the supervisor receives the next verified state
    accepted = start_agent(client, echo_tarball)
    assert accepted["state"] == "ready", accepted
    client.delete(f"/v1/agents/{accepted['agent_id']}")


def test_restart_after_crash_replaces_stale_tables(guarded: Stack) -> None:
    guarded.stop_service("netguard", sig=signal.SIGKILL)
    assert comments(guarded) == expected_comments(guarded)

    guarded.start_netguard()
    assert "replacing tables ['inet', 'bridge'] left by an earlier run" in guarded.log_text(
        "netguard"
    )
    assert comments(guarded) == expected_comments(guarded)


def test_unable_to_apply_exits_nonzero(guarded: Stack, tmp_path: Path) -> None:
    table_name = "ar_unprivileged_probe"
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            str(VENV_BIN / "agent-runner-netguard"),
            f"--firewall-table={table_name}",
            "--sandbox-subnet=172.29.6.0/24",
            "--sandbox-bridge=ar-np0",
        ],
        env={**guarded.env(), "AGENT_RUNNER_HOST_ID": "unprivileged-probe"},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert "netguard cannot apply the firewall, so no agent may start" in result.stderr
    assert table("inet", table_name) is None


def test_disable_firewall_rejected_in_production(guarded: Stack) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "agent-runner-netguard"), "--profile=production", "--disable-firewall"],
        env=guarded.env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "--disable-firewall is rejected by the production profile" in result.stderr


def test_ready_agent_keeps_running_after_netguard_restart(
    guarded: Stack, client: httpx.Client, echo_tarball: Tarball
) -> None:
    agent = start_agent(client, echo_tarball)
    address_count = len(agent_set(guarded))
    guarded.stop_service("netguard")
    guarded.start_netguard()

    assert len(agent_set(guarded)) == address_count
    assert client.get(f"/v1/agents/{agent['agent_id']}/http/").status_code == 200
    client.delete(f"/v1/agents/{agent['agent_id']}")
    wait_for_state(client, agent["agent_id"], {"stopped"}, timeout=30)


def test_metrics_show_firewall_state(guarded: Stack) -> None:
    def metrics() -> str:
        return httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text

    wait_until(
        lambda: "agent_runner_firewall_verified 1.0" in metrics(),
        timeout=10,
        message="metrics never showed a verified firewall",
    )
    text = metrics()
    assert "agent_runner_firewall_enabled 1.0" in text
    assert 'agent_runner_firewall_rule_packets{rule="inet/agent-runner:sandbox-to-host-drop"}' in (
        text
    )
    assert "agent_runner_firewall_drift_total" in text


def test_readiness_shows_verified_firewall(guarded: Stack, client: httpx.Client) -> None:
    # netguard restarted in an earlier test. Its state reaches the gateway with its next
    # periodic check, and a loaded machine can delay that by a few intervals.
    deadline = time.monotonic() + 15
    readiness = client.get("/readyz")
    while readiness.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        readiness = client.get("/readyz")

    assert readiness.status_code == 200, readiness.text
    assert readiness.json()["status"] == "ready"
    assert readiness.json()["firewall"][guarded.host_id] == "verified"
    assert httpx.get(f"{guarded.api_url}/readyz", timeout=5).status_code == 401
