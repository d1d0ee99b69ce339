"""Tests of the segment writer: rotation, recovery after a crash, deduplication."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libs.common.audit_records import CheckpointSigner, list_segments
from libs.common.audit_verify import verify_directory
from services.audit.segments import SegmentError, SegmentWriter
from tests.unit.audit.support import SUBJECT, make_event, write_log


def records(directory: Path) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for segment in list_segments(directory)
        for line in segment.read_bytes().splitlines()
    ]


def reopen(directory: Path, signer: CheckpointSigner) -> SegmentWriter:
    writer = SegmentWriter(directory, signer=signer, segment_max_bytes=1 << 30, recent_ids=1000)
    writer.open()
    return writer


def test_rotation_chains_segments(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=200, segment_max_bytes=8192)

    segments = list_segments(tmp_path)
    report = verify_directory(tmp_path, [signer.public_key])

    assert len(segments) > 3
    assert report.segments == len(segments)
    assert report.complete
    first_lines = [json.loads(path.read_bytes().splitlines()[0]) for path in segments]
    assert all(record["reason"] == "anchor" for record in first_lines)


def test_reopen_continues_chain(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=5)

    writer = reopen(tmp_path, signer)
    writer.add_event(stream_seq=6, subject=SUBJECT, event=make_event(6))
    writer.close()

    report = verify_directory(tmp_path, [signer.public_key])
    assert report.complete
    kinds = [(record["kind"], record.get("reason")) for record in records(tmp_path)]
    assert kinds[-3:] == [("checkpoint", "start"), ("event", None), ("checkpoint", "stop")]


def test_crash_tail_is_cut_and_signed(tmp_path: Path, signer: CheckpointSigner) -> None:
    writer = write_log(tmp_path, signer, events=5, close=False)
    # A crash in the middle of a write leaves half a record that was never acknowledged.
    segment = list_segments(tmp_path)[-1]
    with segment.open("ab") as handle:
        handle.write(b'{"v":1,"kind":"event","seq":7,')
    del writer

    writer = reopen(tmp_path, signer)
    writer.close()

    report = verify_directory(tmp_path, [signer.public_key])
    assert report.records == 1 + 5 + 2
    assert writer.head.stream_seq == 5


def test_repeated_events_are_dropped(tmp_path: Path, signer: CheckpointSigner) -> None:
    event = make_event(1)
    writer = reopen(tmp_path, signer)
    assert writer.add_event(stream_seq=1, subject=SUBJECT, event=event)
    writer.close()

    writer = reopen(tmp_path, signer)
    again_same_sequence = writer.add_event(stream_seq=1, subject=SUBJECT, event=make_event(1))
    again_same_id = writer.add_event(stream_seq=2, subject=SUBJECT, event=event)
    writer.close()

    assert not again_same_sequence
    assert not again_same_id
    stored = [record for record in records(tmp_path) if record["kind"] == "event"]
    assert len(stored) == 1


def test_damaged_newest_segment_stops_writer(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=5)
    segment = list_segments(tmp_path)[-1]
    segment.write_bytes(segment.read_bytes().replace(b"client-3", b"client-9"))
    before = segment.read_bytes()

    with pytest.raises(SegmentError, match="fails verification"):
        reopen(tmp_path, signer)

    assert segment.read_bytes() == before
    assert not list(tmp_path.glob(".verify*"))


def test_invalid_message_is_kept(tmp_path: Path, signer: CheckpointSigner) -> None:
    writer = reopen(tmp_path, signer)
    writer.add_invalid(stream_seq=1, subject="audit.x.y", data=b"\x1b[2J\xff", error="bad")
    writer.close()

    stored = [record for record in records(tmp_path) if record["kind"] == "invalid"]
    assert stored[0]["data"] == "\x1b[2J\ufffd"
    assert b"\\u001b" in list_segments(tmp_path)[0].read_bytes()
    verify_directory(tmp_path, [signer.public_key])
