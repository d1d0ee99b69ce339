"""FirewallStates and ProxyStates: how the gateway summarises each host's published state."""

from __future__ import annotations

from datetime import timedelta

import pytest

from libs.common.messages import FirewallState, ProxyState, new_agent_id, utc_now
from services.api.readiness import PROBE_AGENT_ID, FirewallStates, ProxyStates


def state(*, enabled: bool, verified: bool, age: float) -> FirewallState:
    return FirewallState(
        correlation_id="netguard-h1",
        host_id="h1",
        enabled=enabled,
        verified=verified,
        ruleset_hash=None,
        checked_at=utc_now() - timedelta(seconds=age),
        check_interval=5.0,
    )


@pytest.mark.parametrize(
    ("enabled", "verified", "age", "expected"),
    [
        (True, True, 1, "verified"),
        (True, False, 1, "unverified"),
        (False, False, 1, "disabled"),
        (True, True, 16, "stale"),
        (False, False, 16, "stale"),
    ],
)
def test_status_of_host(enabled: bool, verified: bool, age: float, expected: str) -> None:
    states = FirewallStates()
    states.states["h1"] = state(enabled=enabled, verified=verified, age=age)

    assert states.status() == {"h1": expected}


def test_no_state_means_no_hosts() -> None:
    assert FirewallStates().status() == {}


def proxy_state(*, running: bool, age: float, host: str = "h1") -> ProxyState:
    return ProxyState(
        correlation_id=f"proxy-{host}",
        host_id=host,
        running=running,
        published_at=utc_now() - timedelta(seconds=age),
        publish_interval=5.0,
    )


@pytest.mark.parametrize(
    ("running", "age", "expected"),
    [
        (True, 1, "running"),
        (False, 1, "stopped"),
        (True, 16, "stale"),
        (False, 16, "stale"),
    ],
)
def test_proxy_status_of_host(running: bool, age: float, expected: str) -> None:
    states = ProxyStates()
    states.states["h1"] = proxy_state(running=running, age=age)

    assert states.status(["h1"]) == {"h1": expected}


def test_proxy_of_host_without_state_unknown() -> None:
    states = ProxyStates()
    states.states["h2"] = proxy_state(running=True, age=1, host="h2")

    assert states.status(["h1"]) == {"h1": "unknown", "h2": "running"}


def test_probe_agent_id_never_generated() -> None:
    # new_agent_id() uses UUID4, whose version digit is 4, so the all-zero id is free.
    ids = {new_agent_id() for _ in range(1000)}

    assert PROBE_AGENT_ID not in ids
    assert all(agent_id[3 + 12] == "4" for agent_id in ids)
