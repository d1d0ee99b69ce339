"""Tests for proxy decisions and their reason codes."""

from __future__ import annotations

import pytest

from libs.common.decisions import Decision, Reason


def test_reason_codes_are_snake_case_values() -> None:
    for reason in Reason:
        assert reason.value == reason.name.lower()


def test_decision_allow_and_deny() -> None:
    allowed = Decision.allow("fine")
    denied = Decision.deny(Reason.HOST_BLOCKED, "no")

    assert (allowed.allowed, allowed.reason) == (True, Reason.ALLOWED)
    assert (denied.allowed, denied.reason) == (False, Reason.HOST_BLOCKED)


@pytest.mark.parametrize(
    ("allowed", "reason"),
    [(True, Reason.HOST_BLOCKED), (False, Reason.ALLOWED)],
)
def test_decision_rejects_inconsistent_fields(allowed: bool, reason: Reason) -> None:
    with pytest.raises(ValueError, match="inconsistent decision"):
        Decision(allowed=allowed, reason=reason, detail="x")
