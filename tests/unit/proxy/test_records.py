"""Tests for the decision records: one audit event and one log line per decision."""

from __future__ import annotations

import logging
from typing import Any

import mitmproxy.version
import pytest

from libs.common.decisions import Decision, Reason
from libs.common.messages import AuditOutcome
from services.proxy import header_limit
from services.proxy.records import DecisionRecord


class Audit:
    """Collects what a record emits, in place of the JetStream publisher."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event_type: str, **fields: Any) -> None:
        self.events.append({"type": event_type, **fields})


def record(audit: Audit, decision: Decision, **fields: Any) -> DecisionRecord:
    return DecisionRecord(
        audit=audit,  # type: ignore[arg-type]
        event_type="proxy.request",
        agent_id="ag-1",
        mode="transparent",
        protocol="http",
        client="172.29.0.2:40000",
        decision=decision,
        **fields,
    )


def test_denial_emits_one_event_with_reason_and_details() -> None:
    audit = Audit()
    subject = record(
        audit, Decision.deny(Reason.HOST_BLOCKED, "blocked"), host="evil.test", port=80
    )
    subject.method = "GET"
    subject.set_path("/secret?token=abc#frag")

    subject.finish(status=403)
    subject.finish(status=500)

    [event] = audit.events
    assert event["outcome"] is AuditOutcome.DENIED
    assert event["reason_code"] == "host_blocked"
    assert event["agent_id"] == "ag-1"
    details = event["details"]
    assert details["decision"] == "deny"
    assert details["status"] == 403
    assert details["path"] == "/secret"
    assert (details["host"], details["port"], details["method"]) == ("evil.test", 80, "GET")
    assert set(details) >= {"mode", "bytes_from_agent", "bytes_to_agent", "duration_ms"}


def test_allowed_exchange_counts_bytes_both_ways() -> None:
    audit = Audit()
    subject = record(audit, Decision.allow("ok"))
    subject.bytes_from_agent = 10
    subject.bytes_to_agent = 2000

    subject.finish(status=200)

    [event] = audit.events
    assert event["outcome"] is AuditOutcome.SUCCESS
    assert event["reason_code"] == "allowed"
    assert (event["details"]["bytes_from_agent"], event["details"]["bytes_to_agent"]) == (10, 2000)


def test_finish_can_replace_the_decision() -> None:
    audit = Audit()
    subject = record(audit, Decision.allow("ok"))

    subject.finish(status=413, decision=Decision.deny(Reason.BODY_TOO_LARGE, "too large"))

    assert audit.events[0]["reason_code"] == "body_too_large"
    assert audit.events[0]["outcome"] is AuditOutcome.DENIED


def test_agent_text_escaped_and_cut() -> None:
    audit = Audit()
    subject = record(audit, Decision.deny(Reason.HOST_INVALID, "bad"), host="a\x1b[31m.test" * 100)
    subject.set_path("/\r\ninjected: yes")

    subject.finish()

    details = audit.events[0]["details"]
    assert "\x1b" not in details["host"]
    assert len(details["host"]) < 300
    assert "\r" not in details["path"]
    assert "\n" not in details["path"]


def test_one_log_line_per_decision(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.proxy.records")
    subject = record(Audit(), Decision.deny(Reason.RATE_LIMITED, "flood"), host="a.test")

    subject.finish(status=429)
    subject.finish(status=429)

    [line] = caplog.records
    assert "rate_limited" in line.getMessage()
    assert line.agent_id == "ag-1"  # type: ignore[attr-defined]


def test_header_limit_refuses_other_mitmproxy_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mitmproxy.version, "VERSION", "12.0.0")

    with pytest.raises(RuntimeError) as error:
        header_limit.install(1024, lambda client, size: None)

    assert "12.0.0" in str(error.value)
    assert header_limit.SUPPORTED_MITMPROXY in str(error.value)
