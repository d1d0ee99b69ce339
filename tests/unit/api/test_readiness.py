"""FirewallStates: how the gateway summarises each host's published firewall state."""

from __future__ import annotations

from datetime import timedelta

import pytest

from libs.common.messages import FirewallState, utc_now
from services.api.readiness import FirewallStates


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
