"""RepeatedEvents: one audit event per group and window, with exact counts."""

from __future__ import annotations

from typing import Any

from libs.common import logs
from libs.common.messages import AuditOutcome
from services.api.repeats import RepeatedEvents


class FakeClock:
    """A clock that stays where a test puts it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingAudit:
    """Collect what would be published, with the correlation id bound at the time."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event_type: str, **fields: Any) -> None:
        self.events.append(
            {"type": event_type, "correlation_id": logs.current_correlation_id(), **fields}
        )


def repeated(audit: RecordingAudit, clock: FakeClock, **options: Any) -> RepeatedEvents:
    return RepeatedEvents(
        audit,  # type: ignore[arg-type]
        "auth.succeeded",
        outcome=AuditOutcome.SUCCESS,
        reason_code="authenticated",
        window_seconds=60.0,
        clock=clock,
        **options,
    )


def test_first_occurrence_sent_at_once() -> None:
    audit = RecordingAudit()
    events = repeated(audit, FakeClock())

    opened = events.record(actor="ci", key_id="ci", client="203.0.113.7")

    assert opened is True
    assert len(audit.events) == 1
    assert audit.events[0]["type"] == "auth.succeeded"
    assert audit.events[0]["actor"] == "ci"
    assert audit.events[0]["outcome"] == AuditOutcome.SUCCESS
    assert audit.events[0]["details"] == {
        "key_id": "ci",
        "client": "203.0.113.7",
        "requests": 1,
        "window_seconds": 60.0,
    }


def test_repeats_counted_until_window_ends() -> None:
    audit = RecordingAudit()
    clock = FakeClock()
    events = repeated(audit, clock)
    for _ in range(5):
        events.record(actor="ci", key_id="ci", client="203.0.113.7")

    events.flush()
    before_end = len(audit.events)
    clock.now += 60
    events.flush()

    assert before_end == 1
    assert len(audit.events) == 2
    assert audit.events[1]["details"]["requests"] == 4


def test_counts_sum_to_occurrences() -> None:
    audit = RecordingAudit()
    clock = FakeClock()
    events = repeated(audit, clock)
    for step in range(250):
        clock.now = 1000.0 + step
        events.record(actor="ci", key_id="ci", client="203.0.113.7")

    events.flush(all_windows=True)

    assert sum(event["details"]["requests"] for event in audit.events) == 250


def test_next_window_opens_with_new_event() -> None:
    audit = RecordingAudit()
    clock = FakeClock()
    events = repeated(audit, clock)
    events.record(actor="ci", key_id="ci", client="203.0.113.7")
    events.record(actor="ci", key_id="ci", client="203.0.113.7")

    clock.now += 61
    opened = events.record(actor="ci", key_id="ci", client="203.0.113.7")

    assert opened is True
    assert [event["details"]["requests"] for event in audit.events] == [1, 1, 1]


def test_groups_counted_apart() -> None:
    audit = RecordingAudit()
    events = repeated(audit, FakeClock())

    events.record(actor="ci", key_id="ci", client="203.0.113.7")
    events.record(actor="ci", key_id="ci", client="203.0.113.8")
    events.record(actor="ops", key_id="ops", client="203.0.113.7")

    assert len(audit.events) == 3


def test_summary_has_no_request_correlation_id() -> None:
    audit = RecordingAudit()
    clock = FakeClock()
    events = repeated(audit, clock)
    with logs.correlation_scope("req-1"):
        events.record(actor="ci", key_id="ci", client="203.0.113.7")
        events.record(actor="ci", key_id="ci", client="203.0.113.7")
    clock.now += 60

    with logs.correlation_scope("req-2"):
        events.record(actor="ci", key_id="ci", client="203.0.113.7")

    assert [event["correlation_id"] for event in audit.events] == ["req-1", None, "req-2"]


def test_groups_bounded_by_overflow() -> None:
    audit = RecordingAudit()
    events = repeated(audit, FakeClock(), max_groups=2)

    for index in range(5):
        events.record(actor="ci", key_id="ci", client=f"198.51.100.{index}")
    events.flush(all_windows=True)

    overflow = [event for event in audit.events if event["details"]["client"] == "other"]
    assert len(audit.events) == 4
    assert [event["details"]["requests"] for event in overflow] == [1, 2]
    assert overflow[0]["details"]["key_id"] == "other"


async def test_close_sends_open_counts() -> None:
    audit = RecordingAudit()
    events = repeated(audit, FakeClock())
    events.start()
    events.record(actor="ci", key_id="ci", client="203.0.113.7")
    events.record(actor="ci", key_id="ci", client="203.0.113.7")

    await events.close()

    assert [event["details"]["requests"] for event in audit.events] == [1, 1]
