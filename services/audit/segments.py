"""The audit sink's writer: appends chained records to segment files and fsyncs them.

Records of a batch are encoded and hashed in memory by `add_*`, written and fsync'd together by
`sync`, and only then may the caller acknowledge the batch's messages, so an acknowledged event
is always on disk.

`open` recovers the state of the last run from the files. It removes an incomplete last line
that a crash left, because that record was never acknowledged and JetStream delivers it again.
Then it verifies the newest segment and reloads the head of the chain and the ids of the
newest events for deduplication.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from libs.common.audit_records import (
    FORMAT_VERSION,
    GENESIS_HASH,
    PUBLIC_KEY_PATTERN,
    CheckpointReason,
    CheckpointSigner,
    RecordKind,
    canonical_bytes,
    list_segments,
    load_public_key,
    record_hash,
    segment_name,
)
from libs.common.audit_verify import VerificationError, verify_segments

logger = logging.getLogger(__name__)


class SegmentError(Exception):
    """The audit folder cannot be continued safely; the message names what to check."""


@dataclass
class _Head:
    seq: int  # of the newest record written (0 before the first)
    hash: str  # of the newest record written
    stream_seq: int  # JetStream sequence of the newest event written (0 before the first)


class RecentIds:
    """The newest event ids, bounded, to drop events that are delivered a second time."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: str) -> None:
        """Remember `event_id`, forgetting the oldest id when full."""
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


class SegmentWriter:
    """Append-only writer of one audit folder; a single instance may write a folder at a time."""

    def __init__(
        self,
        directory: Path,
        *,
        signer: CheckpointSigner,
        segment_max_bytes: int,
        recent_ids: int,
    ) -> None:
        self.directory = directory
        self.signer = signer
        self.segment_max_bytes = segment_max_bytes
        self.recent = RecentIds(recent_ids)
        self.head = _Head(seq=0, hash=GENESIS_HASH, stream_seq=0)
        self.records_since_checkpoint = 0
        self._pending: list[bytes] = []
        self._file: int | None = None
        self._segment = ""
        self._size = 0

    @property
    def segment(self) -> str:
        """File name of the segment being written."""
        return self._segment

    @property
    def segment_size(self) -> int:
        """Bytes in the segment being written, including records not yet synced."""
        return self._size

    def open(self) -> None:
        """Continue the newest segment, or start the log; raises SegmentError on a bad log."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        segments = list_segments(self.directory)
        if segments and segments[-1].stat().st_size == 0:
            # A crash between creating a segment and writing its anchor.
            logger.warning("removing empty segment %s left by a crash", segments[-1].name)
            segments.pop().unlink()
        if not segments:
            self._start_segment(1)
            return
        newest = segments[-1]
        self._remove_incomplete_line(newest)
        self._check_newest(newest)
        self._load_state(segments)
        self._segment = newest.name
        self._file = os.open(newest, os.O_WRONLY | os.O_APPEND)
        self._size = newest.stat().st_size
        self.add_checkpoint(CheckpointReason.START)
        self.sync()

    def close(self) -> None:
        """Write a final checkpoint, sync and close."""
        if self._file is None:
            return
        self.add_checkpoint(CheckpointReason.STOP)
        self.sync()
        os.close(self._file)
        self._file = None

    def add_event(self, *, stream_seq: int, subject: str, event: dict[str, Any]) -> bool:
        """Queue an event record; return False (and queue nothing) when it is a duplicate."""
        event_id = str(event.get("event_id"))
        if stream_seq <= self.head.stream_seq or event_id in self.recent:
            return False
        self._add(
            RecordKind.EVENT,
            {"stream_seq": stream_seq, "subject": subject, "event": event},
        )
        self.head.stream_seq = stream_seq
        self.recent.add(event_id)
        return True

    def add_invalid(self, *, stream_seq: int, subject: str, data: bytes, error: str) -> bool:
        """Queue a record of a message that is not a valid event; False when seen already."""
        if stream_seq <= self.head.stream_seq:
            return False
        text = data.decode("utf-8", errors="replace")
        self._add(
            RecordKind.INVALID,
            {"stream_seq": stream_seq, "subject": subject, "data": text, "error": error},
        )
        self.head.stream_seq = stream_seq
        return True

    def add_checkpoint(self, reason: CheckpointReason) -> None:
        """Queue a signed checkpoint over the chain head."""
        self._add(
            RecordKind.CHECKPOINT,
            {
                "reason": str(reason),
                "segment": self._segment,
                "time": _now(),
                "stream_seq": self.head.stream_seq,
            },
            sign=True,
        )
        self.records_since_checkpoint = 0
        # The seq:hash pair is the form `agent-runner audit verify --witness` takes, so a copy
        # of this log line kept elsewhere proves that the log was not cut off before it.
        logger.info(
            "wrote %s checkpoint %d:%s in %s",
            reason,
            self.head.seq,
            self.head.hash,
            self._segment,
        )

    def add_retention(self, *, removed: list[str], first_retained_seq: int) -> None:
        """Queue the record that names the segments retention is about to delete."""
        self._add(
            RecordKind.RETENTION,
            {"time": _now(), "removed": removed, "first_retained_seq": first_retained_seq},
        )

    def sync(self) -> None:
        """Write the queued records and fsync the segment; only then are they durable."""
        if self._file is None or not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        written = os.write(self._file, data)
        while written < len(data):
            written += os.write(self._file, data[written:])
        os.fsync(self._file)

    def rotate_if_full(self) -> bool:
        """Close a segment that reached the size limit and start the next; True if rotated."""
        if self._size < self.segment_max_bytes:
            return False
        self.add_checkpoint(CheckpointReason.SEGMENT_END)
        self.sync()
        assert self._file is not None
        os.close(self._file)
        self._start_segment(self.head.seq + 1)
        return True

    def _add(self, kind: RecordKind, fields: dict[str, Any], *, sign: bool = False) -> None:
        record = {"v": FORMAT_VERSION, "kind": str(kind), "seq": self.head.seq + 1}
        record["prev"] = self.head.hash
        record.update(fields)
        if sign:
            record = self.signer.sign(record)
        line = canonical_bytes(record)
        self._pending.append(line + b"\n")
        self._size += len(line) + 1
        self.head.seq += 1
        self.head.hash = record_hash(line)
        self.records_since_checkpoint += 1

    def _start_segment(self, first_seq: int) -> None:
        self._segment = segment_name(first_seq)
        path = self.directory / self._segment
        self._file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        self._size = 0
        _fsync_directory(self.directory)
        self.add_checkpoint(CheckpointReason.ANCHOR)
        self.sync()
        logger.info("started segment %s", self._segment)

    def _remove_incomplete_line(self, path: Path) -> None:
        data = path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        logger.warning(
            "removing an incomplete last record (%d bytes) from %s; it was never acknowledged, "
            "so JetStream delivers it again",
            len(data) - keep,
            path.name,
        )
        with path.open("r+b") as handle:
            handle.truncate(keep)
            os.fsync(handle.fileno())

    def _check_newest(self, newest: Path) -> None:
        # Only the newest segment is checked: appending needs its head to be sound, and a
        # full verification of a large folder is what `agent-runner audit verify` is for.
        # Keys in the folder are accepted besides the current one, so a rotated key does not
        # stop the sink. The operator's verify run decides which keys to trust.
        keys = [self.signer.public_key]
        for path in sorted(self.directory.glob(PUBLIC_KEY_PATTERN)):
            with contextlib.suppress(ValueError):
                keys.append(load_public_key(path))
        try:
            verify_segments([newest], keys, allow_unsigned_tail=True, check_start=False)
        except VerificationError as exc:
            raise SegmentError(
                f"the newest audit segment fails verification: {exc}. The sink does not append "
                "to a damaged log; run `agent-runner audit verify` on the folder, keep a copy, "
                "then move the damaged segments away"
            ) from exc

    def _load_state(self, segments: list[Path]) -> None:
        # The newest record gives the head. Event ids come from as many of the newest segments
        # as needed to fill the duplicate filter, read oldest first so the newest ids stay.
        chosen: list[Path] = []
        lines = 0
        for path in reversed(segments):
            chosen.insert(0, path)
            lines += path.read_bytes().count(b"\n")
            if lines >= self.recent.capacity:
                break
        last_line = b""
        for path in chosen:
            for line in path.read_bytes().splitlines():
                record = json.loads(line)
                if record["kind"] == RecordKind.EVENT:
                    self.recent.add(str(record["event"].get("event_id")))
                self.head.stream_seq = max(self.head.stream_seq, record.get("stream_seq", 0))
                self.head.seq = record["seq"]
                last_line = line
        self.head.hash = record_hash(last_line)
        logger.info(
            "continuing %s at seq %d, JetStream sequence %d, %d event ids remembered",
            segments[-1].name,
            self.head.seq,
            self.head.stream_seq,
            len(self.recent),
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
