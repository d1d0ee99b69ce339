"""Tests for the supervisor's firewall gate: which netguard states let an agent start."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import pytest
from nats.aio.client import Client as NatsClient

from libs.common.bus import encode
from libs.common.messages import FirewallState, firewall_state_subject, utc_now
from services.supervisor.errors import AgentStartError, FailureReason
from services.supervisor.firewall_gate import STALE_AFTER_INTERVALS, FirewallGate

HOST = "unit-host"
INTERVAL = 5.0
RULESET_HASH = "sha256:" + "a" * 64


def state(*, age: float = 0.0, **fields: Any) -> FirewallState:
    """Return a verified, enabled state checked `age` seconds ago, updated with `fields`."""
    values: dict[str, Any] = {
        "correlation_id": f"netguard-{HOST}",
        "host_id": HOST,
        "enabled": True,
        "verified": True,
        "ruleset_hash": RULESET_HASH,
        "checked_at": utc_now() - timedelta(seconds=age),
        "check_interval": INTERVAL,
        **fields,
    }
    return FirewallState(**values)


def gate(current: FirewallState | None, *, allow_disabled: bool = False) -> FirewallGate:
    """Return a gate that received `current` at the time its checked_at names.

    require_usable does not use NATS.
    """
    firewall_gate = FirewallGate(
        cast(NatsClient, None), host_id=HOST, allow_disabled=allow_disabled, timeout=1.0
    )
    firewall_gate.state = current
    if current is not None:
        age = (utc_now() - current.checked_at).total_seconds()
        firewall_gate._received_at = time.monotonic() - age
    return firewall_gate


STALE_AGE = INTERVAL * STALE_AFTER_INTERVALS + 1
FRESH_AGE = INTERVAL * STALE_AFTER_INTERVALS - 1


# Each case builds its state when it runs, so that the time pytest takes to collect does
# not age it.
@pytest.mark.parametrize(
    ("fields", "allow_disabled", "message"),
    [
        pytest.param(None, False, "no firewall state from netguard on host unit-host", id="none"),
        pytest.param(None, True, "no firewall state", id="none-development"),
        pytest.param({"age": STALE_AGE}, False, f"is {STALE_AGE:.0f} s old", id="stale"),
        pytest.param(
            {"age": STALE_AGE, "enabled": False, "verified": False},
            True,
            "s old",
            id="stale-disabled-development",
        ),
        pytest.param({"age": 3600, "check_interval": 1.0}, False, "is 3600 s old", id="stale-hour"),
        pytest.param(
            {"verified": False, "ruleset_hash": None, "detail": "{'missing_rules': ['x']}"},
            False,
            "the firewall is not verified: {'missing_rules': ['x']}",
            id="unverified",
        ),
        pytest.param(
            {"verified": False, "ruleset_hash": None},
            True,
            "not verified: no detail",
            id="unverified-development",
        ),
        pytest.param(
            {"enabled": False, "verified": False, "ruleset_hash": None},
            False,
            "--disable-firewall",
            id="disabled-production",
        ),
    ],
)
def test_start_rejected(fields: dict[str, Any] | None, allow_disabled: bool, message: str) -> None:
    current = None if fields is None else state(**fields)

    with pytest.raises(AgentStartError) as error:
        gate(current, allow_disabled=allow_disabled).require_usable()

    assert error.value.reason == FailureReason.FIREWALL_NOT_VERIFIED
    assert error.value.reason.value == "firewall_not_verified"
    assert message in error.value.message


def test_fresh_verified_state_allows_start() -> None:
    assert gate(state()).require_usable() is False


def test_state_inside_stale_limit_allowed() -> None:
    assert gate(state(age=FRESH_AGE)).require_usable() is False


def test_stale_limit_follows_state_interval() -> None:
    # Ten seconds is stale at a 1 s interval and fresh at a 5 s interval.
    assert gate(state(age=10, check_interval=5.0)).require_usable() is False
    with pytest.raises(AgentStartError):
        gate(state(age=10, check_interval=1.0)).require_usable()


def test_disabled_firewall_tolerated_in_development() -> None:
    current = state(enabled=False, verified=False, ruleset_hash=None)

    assert gate(current, allow_disabled=True).require_usable() is True


def test_verified_state_in_development() -> None:
    assert gate(state(), allow_disabled=True).require_usable() is False


@dataclass
class FakeMsg:
    """The two attributes of a NATS message that the gate reads."""

    data: bytes
    subject: str = firewall_state_subject(HOST)


async def test_state_message_stored() -> None:
    firewall_gate = gate(None)
    received = state(verified=False, ruleset_hash=None, detail="drift")

    await firewall_gate._on_state(FakeMsg(encode(received)))  # type: ignore[arg-type]

    assert firewall_gate.state == received


async def test_invalid_state_message_ignored() -> None:
    previous = state()
    firewall_gate = gate(previous)

    await firewall_gate._on_state(FakeMsg(b'{"kind": "firewall_state", "verified": true}'))  # type: ignore[arg-type]

    assert firewall_gate.state == previous


async def test_state_from_the_future_ignored() -> None:
    firewall_gate = gate(None)
    ahead = state(age=-3 * INTERVAL)

    await firewall_gate._on_state(FakeMsg(encode(ahead)))  # type: ignore[arg-type]

    assert firewall_gate.state is None
