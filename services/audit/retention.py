"""Retention of the audit folder: delete whole old segments by age and by total size.

Only a prefix of the segments is ever deleted, oldest first, and never the segment being
written. Every segment starts with a signed anchor checkpoint, so the oldest retained segment
is a verifiable start of the chain. Before deleting, the sink writes a retention record that
names the first record that must still exist, so `agent-runner audit verify` can tell pruning
from deletion by someone else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from libs.common.audit_records import SEGMENT_PATTERN, list_segments

logger = logging.getLogger(__name__)

# The last record of a closed segment is its segment_end checkpoint, far smaller than this.
_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class SegmentInfo:
    """A segment with the facts that retention decides on."""

    path: Path
    size: int
    first_seq: int
    closed_at: datetime | None  # time of its segment_end checkpoint; None while written


def select_expired(
    segments: list[SegmentInfo],
    *,
    now: datetime,
    retention_days: float,
    max_size: int,
) -> list[SegmentInfo]:
    """Return the oldest segments to delete so that the rest meet both limits.

    `retention_days` 0 keeps segments of any age and `max_size` 0 any total size (bytes). The
    newest segment always stays, even when it alone exceeds `max_size`.
    """
    expired: list[SegmentInfo] = []
    total = sum(segment.size for segment in segments)
    cutoff = now - timedelta(days=retention_days) if retention_days > 0 else None
    for segment in segments[:-1]:
        too_old = cutoff is not None and (
            segment.closed_at is not None and segment.closed_at < cutoff
        )
        too_large = max_size > 0 and total > max_size
        if not (too_old or too_large):
            break
        expired.append(segment)
        total -= segment.size
    return expired


def describe_segments(directory: Path) -> list[SegmentInfo]:
    """Return every segment in `directory` with its size, first seq and closing time."""
    infos = []
    for path in list_segments(directory):
        match = SEGMENT_PATTERN.match(path.name)
        assert match is not None
        infos.append(
            SegmentInfo(
                path=path,
                size=path.stat().st_size,
                first_seq=int(match.group(1)),
                closed_at=_closing_time(path),
            )
        )
    return infos


def _closing_time(path: Path) -> datetime | None:
    with path.open("rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - _TAIL_BYTES))
        lines = handle.read().splitlines()
    if not lines:
        return None
    try:
        record = json.loads(lines[-1])
    except ValueError:
        return None  # an incomplete line: the segment is still written or damaged
    if record.get("kind") != "checkpoint" or record.get("reason") != "segment_end":
        return None
    return datetime.fromisoformat(record["time"])


@dataclass(frozen=True)
class RetentionPlan:
    """Segments to delete and the seq of the first record that stays."""

    expired: list[SegmentInfo]
    first_retained_seq: int

    @property
    def names(self) -> list[str]:
        """File names of the segments to delete."""
        return [segment.path.name for segment in self.expired]


def plan_retention(
    directory: Path, *, now: datetime, retention_days: float, max_size: int
) -> RetentionPlan | None:
    """Return which segments of `directory` retention deletes now, or None for none."""
    segments = describe_segments(directory)
    expired = select_expired(segments, now=now, retention_days=retention_days, max_size=max_size)
    if not expired:
        return None
    return RetentionPlan(expired=expired, first_retained_seq=segments[len(expired)].first_seq)


def delete_segments(plan: RetentionPlan) -> None:
    """Delete the planned segments, oldest first.

    The caller writes and syncs the retention record before this, so a crash in between leaves
    segments that the record allows to be deleted, never deleted segments without a record.
    """
    for segment in plan.expired:
        segment.path.unlink(missing_ok=True)
        logger.info(
            "retention deleted %s (%d bytes, closed %s)",
            segment.path.name,
            segment.size,
            segment.closed_at,
        )
