"""Tests of retention: which segments expire, and that the rest still verifies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from libs.common.audit_records import CheckpointSigner, list_segments
from libs.common.audit_verify import VerificationError, verify_directory
from services.audit.retention import (
    SegmentInfo,
    delete_segments,
    plan_retention,
    select_expired,
)
from services.audit.segments import SegmentWriter
from tests.unit.audit.support import write_log

NOW = datetime(2026, 12, 5, tzinfo=UTC)


def segment(number: int, *, size: int = 100, age_days: float | None = 1) -> SegmentInfo:
    closed = None if age_days is None else NOW - timedelta(days=age_days)
    return SegmentInfo(path=Path(f"s{number}"), size=size, first_seq=number, closed_at=closed)


@pytest.mark.parametrize(
    ("ages", "retention_days", "max_size", "expired"),
    [
        ([10, 5, 1, None], 0, 0, 0),  # no limits keep everything
        ([10, 5, 1, None], 3, 0, 2),
        ([10, 5, 1, None], 30, 0, 0),
        ([10, 1, 5, None], 3, 0, 1),  # only a prefix: the old segment after a new one stays
        ([10, 5, 1, None], 0, 250, 2),
        ([10, 5, 1, None], 0, 50, 3),  # the newest segment stays even when alone too large
        ([10, 5, 1, None], 3, 350, 2),
    ],
)
def test_select_expired(
    ages: list[float | None], retention_days: float, max_size: int, expired: int
) -> None:
    segments = [segment(index, age_days=age) for index, age in enumerate(ages, start=1)]

    chosen = select_expired(segments, now=NOW, retention_days=retention_days, max_size=max_size)

    assert chosen == segments[:expired]


def prune(directory: Path, signer: CheckpointSigner, *, max_size: int) -> list[str]:
    """Prune like the sink: record the plan, sync, then delete."""
    plan = plan_retention(directory, now=datetime.now(UTC), retention_days=0, max_size=max_size)
    assert plan is not None
    writer = SegmentWriter(directory, signer=signer, segment_max_bytes=8192, recent_ids=1000)
    writer.open()
    writer.add_retention(removed=plan.names, first_retained_seq=plan.first_retained_seq)
    writer.sync()
    delete_segments(plan)
    writer.close()
    return plan.names


def test_pruned_log_verifies(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=300, segment_max_bytes=8192)
    before = list_segments(tmp_path)

    removed = prune(tmp_path, signer, max_size=4 * 8192)

    report = verify_directory(tmp_path, [signer.public_key])
    assert removed == [path.name for path in before[: len(removed)]]
    assert len(removed) >= 2
    assert not report.complete
    assert report.first_seq > 1


def test_deletion_beyond_retention_is_detected(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=300, segment_max_bytes=8192)
    prune(tmp_path, signer, max_size=4 * 8192)
    oldest = list_segments(tmp_path)[0]
    oldest.unlink()

    with pytest.raises(VerificationError, match="segments were deleted"):
        verify_directory(tmp_path, [signer.public_key])


def test_deletion_without_retention_is_detected(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=300, segment_max_bytes=8192)
    list_segments(tmp_path)[0].unlink()

    with pytest.raises(VerificationError, match="no retention record") as caught:
        verify_directory(tmp_path, [signer.public_key])

    assert caught.value.line == 1


def test_missing_middle_segment_is_detected(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=300, segment_max_bytes=8192)
    middle = list_segments(tmp_path)[2]
    middle.unlink()

    with pytest.raises(VerificationError, match="deleted, inserted or reordered") as caught:
        verify_directory(tmp_path, [signer.public_key])

    assert caught.value.line == 1
