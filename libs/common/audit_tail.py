"""Terminal output of audit records for `agent-runner audit tail`.

Audit details contain text that agents and clients chose, such as request paths and image
names. Each output line therefore passes through `sanitize_line`, so no escape sequence,
carriage return or bidirectional control in a record reaches the operator's terminal.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from libs.common.audit_records import list_segments
from libs.common.sanitize import sanitize_line

MAX_LINE_CHARACTERS = 4096
POLL_SECONDS = 0.5


def format_record(raw: bytes) -> str:
    """Return one record as a single safe line: seq, kind and the fields that matter."""
    try:
        record: dict[str, Any] = json.loads(raw)
    except ValueError:
        text = "unreadable record " + raw.decode("utf-8", errors="replace")
    else:
        text = _describe(record)
    return sanitize_line(text.encode(), max_length=MAX_LINE_CHARACTERS)[0]


def _describe(record: dict[str, Any]) -> str:
    seq = record.get("seq")
    kind = record.get("kind")
    if kind == "event" and isinstance(record.get("event"), dict):
        event = record["event"]
        fields = [
            f"{seq}",
            str(event.get("time")),
            f"{event.get('service')}.{event.get('type')}",
            str(event.get("outcome")),
            f"actor={event.get('actor')}",
        ]
        for name in ("agent_id", "reason_code", "correlation_id"):
            if event.get(name):
                fields.append(f"{name}={event[name]}")
        if event.get("details"):
            fields.append("details=" + json.dumps(event["details"], sort_keys=True))
        return " ".join(fields)
    if kind == "checkpoint":
        return (
            f"{seq} {record.get('time')} checkpoint {record.get('reason')} "
            f"key={record.get('key_id')} segment={record.get('segment')}"
        )
    if kind == "retention":
        return (
            f"{seq} {record.get('time')} retention removed={record.get('removed')} "
            f"first_retained_seq={record.get('first_retained_seq')}"
        )
    return f"{seq} {kind} " + json.dumps(
        {name: value for name, value in record.items() if name not in ("v", "prev")},
        sort_keys=True,
    )


def last_lines(directory: Path, count: int) -> tuple[list[bytes], Path | None, int]:
    """Return the newest `count` records, the newest segment and its size when read."""
    segments = list_segments(directory)
    newest: deque[bytes] = deque(maxlen=count)
    size = 0
    for path in segments[-2:] if count else []:
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        newest.extend(complete.splitlines())
        size = len(complete)
    return list(newest), (segments[-1] if segments else None), size


def follow(
    directory: Path,
    segment: Path | None,
    offset: int,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[bytes]:
    """Yield records appended after `offset` in `segment`, then in every newer segment.

    Polls every POLL_SECONDS until `should_stop` returns true; an incomplete last line is
    kept until its newline arrives.
    """
    buffer = b""
    while not should_stop():
        segments = list_segments(directory)
        if segment is None or segment not in segments:
            # Retention deleted the segment being followed, or none existed yet.
            segment, offset, buffer = (segments[0] if segments else None), 0, b""
        if segment is None:
            time.sleep(POLL_SECONDS)
            continue
        with segment.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        offset += len(chunk)
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        yield from complete
        newer = [path for path in segments if path > segment]
        if not chunk and newer and not buffer:
            segment, offset = newer[0], 0
            continue
        if not chunk:
            time.sleep(POLL_SECONDS)
