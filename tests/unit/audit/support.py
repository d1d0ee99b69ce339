"""Builders of audit folders for the unit tests, written by the real segment writer."""

from __future__ import annotations

import uuid
from pathlib import Path

from libs.common.audit_records import CheckpointReason, CheckpointSigner
from services.audit.segments import SegmentWriter

SUBJECT = "audit.api.auth.attempt"


def make_event(number: int) -> dict[str, object]:
    """Return an audit event as the sink stores it."""
    return {
        "schema_version": 1,
        "event_id": uuid.uuid4().hex,
        "time": "2026-12-05T01:00:00Z",
        "service": "api",
        "host": "unit-host",
        "type": "auth.attempt",
        "actor": f"client-{number}",
        "outcome": "success",
        "agent_id": None,
        "correlation_id": None,
        "reason_code": None,
        "details": {"number": number},
    }


def write_log(
    directory: Path,
    signer: CheckpointSigner,
    *,
    events: int,
    segment_max_bytes: int = 1 << 30,
    checkpoint_every: int = 0,
    close: bool = True,
) -> SegmentWriter:
    """Write `events` events to `directory` with a real writer, as the sink does."""
    writer = SegmentWriter(
        directory, signer=signer, segment_max_bytes=segment_max_bytes, recent_ids=1000
    )
    writer.open()
    for number in range(1, events + 1):
        writer.add_event(stream_seq=number, subject=SUBJECT, event=make_event(number))
        writer.sync()
        if checkpoint_every and number % checkpoint_every == 0:
            writer.add_checkpoint(CheckpointReason.INTERVAL)
            writer.sync()
        writer.rotate_if_full()
    if close:
        writer.close()
    return writer
