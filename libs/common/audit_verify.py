"""Verification of an audit folder: the hash chain, the sequence numbers and the signatures.

`agent-runner audit verify` and the audit sink (before it appends to an existing log) call
`verify_directory`. It reads every segment oldest first and stops at the first record that
breaks a rule, naming its file, line and sequence number:

- each line is canonical JSON of a known record kind (an edited byte breaks this or a hash);
- `seq` grows by one per record (a deleted, inserted or reordered record breaks this);
- `prev` is the SHA-256 of the record before (an edited record breaks its successor's `prev`);
- each checkpoint names its own segment and is signed by a trusted key (a forged one is not);
- each segment starts with an anchor checkpoint and every segment but the newest ends with a
  segment_end checkpoint, so a whole segment cannot vanish from the middle;
- the log starts at the genesis record or at the first record that the newest retention
  record names as the first to keep, so pruning is allowed and deleting more than it is not;
- the newest record is a checkpoint, unless an unsigned tail is explicitly allowed, so
  cutting records off the end is detected.

Truncating a log exactly after one of its checkpoints leaves a valid, shorter log. The sink
therefore logs the seq and hash of every checkpoint it writes. Given such a pair (a witness)
from a copy kept elsewhere, verification also fails when that record is missing or different.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from libs.common.audit_records import (
    FORMAT_VERSION,
    GENESIS_HASH,
    CheckpointReason,
    RecordKind,
    canonical_bytes,
    key_id,
    list_segments,
    record_hash,
    signature_is_valid,
)

_HASH_LENGTH = 64
_REQUIRED_FIELDS: dict[RecordKind, tuple[str, ...]] = {
    RecordKind.EVENT: ("stream_seq", "subject", "event"),
    RecordKind.INVALID: ("stream_seq", "subject", "data", "error"),
    RecordKind.CHECKPOINT: ("reason", "segment", "time", "stream_seq", "key_id", "signature"),
    RecordKind.RETENTION: ("time", "removed", "first_retained_seq"),
}


class VerificationError(Exception):
    """A record breaks the chain; `segment`, `line` and `seq` locate the first bad record."""

    def __init__(self, message: str, *, segment: str, line: int, seq: int | None) -> None:
        location = f"{segment} line {line}" + (f" (seq {seq})" if seq is not None else "")
        super().__init__(f"{location}: {message}")
        self.segment = segment
        self.line = line
        self.seq = seq
        self.reason = message


@dataclass(frozen=True)
class VerificationReport:
    """Summary of a successful verification."""

    segments: int
    records: int
    first_seq: int
    last_seq: int
    last_checkpoint_seq: int
    unsigned_tail: int
    complete: bool  # true when the log starts at the genesis record, so nothing was pruned


@dataclass(frozen=True)
class _Position:
    segment: str
    line: int
    seq: int | None


class _ChainState:
    """The running state of one pass over the segments."""

    def __init__(self, keys: dict[str, Ed25519PublicKey], witnesses: dict[int, str]) -> None:
        self.keys = keys
        self.witnesses = witnesses
        self.records = 0
        self.first_seq: int | None = None
        self.first_prev: str | None = None
        self.expected_seq: int | None = None
        self.prev_hash: str | None = None
        self.previous: _Position | None = None
        self.last_record: dict[str, Any] | None = None
        self.last_checkpoint: _Position | None = None
        self.since_checkpoint = 0
        self.first_unsigned: _Position | None = None
        self.first_retained_seq: int | None = None
        self.retention_position: _Position | None = None


def _parse(raw: bytes, position: _Position) -> dict[str, Any]:
    def fail(message: str) -> VerificationError:
        return VerificationError(message, segment=position.segment, line=position.line, seq=None)

    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise fail(f"not valid JSON ({exc}); the record was edited or cut") from exc
    if not isinstance(record, dict):
        raise fail("not a JSON object; the record was edited")
    try:
        canonical = canonical_bytes(record)
    except ValueError as exc:
        raise fail(f"cannot be encoded canonically ({exc}); the record was edited") from exc
    if canonical != raw:
        raise fail("not in canonical form; the record was edited")
    if record.get("v") != FORMAT_VERSION:
        raise fail(f"format version {record.get('v')!r} is not {FORMAT_VERSION}")
    kind = record.get("kind")
    if kind not in set(RecordKind):
        raise fail(f"record kind {kind!r} is unknown; expected one of {sorted(RecordKind)}")
    seq = record.get("seq")
    prev = record.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise fail(f"seq {seq!r} is not a positive integer")
    if not isinstance(prev, str) or len(prev) != _HASH_LENGTH:
        raise fail(f"prev {prev!r} is not a SHA-256 hex digest")
    missing = [name for name in _REQUIRED_FIELDS[RecordKind(kind)] if name not in record]
    if missing:
        raise VerificationError(
            f"{kind} record lacks {missing}",
            segment=position.segment,
            line=position.line,
            seq=seq,
        )
    return record


def _check_link(
    state: _ChainState, record: dict[str, Any], raw: bytes, position: _Position
) -> None:
    seq = record["seq"]

    def fail(message: str, where: _Position = position) -> VerificationError:
        return VerificationError(message, segment=where.segment, line=where.line, seq=where.seq)

    if state.expected_seq is None:
        # The oldest retained record: nothing before it can be checked, so it must be a signed
        # anchor, and the retention rule below decides whether records before it may be gone.
        if record["kind"] != RecordKind.CHECKPOINT or record["reason"] != CheckpointReason.ANCHOR:
            raise fail("the oldest retained record is not an anchor checkpoint")
        state.first_seq = seq
        state.first_prev = record["prev"]
    else:
        if seq != state.expected_seq:
            raise fail(
                f"seq {seq} where {state.expected_seq} was expected; records were deleted, "
                "inserted or reordered here"
            )
        if record["prev"] != state.prev_hash:
            assert state.previous is not None
            raise fail(
                "hash does not match the prev of the next record; this record was changed "
                "(or the prev of the next one was)",
                state.previous,
            )
    if position.line == 1 and (
        record["kind"] != RecordKind.CHECKPOINT or record["reason"] != CheckpointReason.ANCHOR
    ):
        raise fail("a segment must start with an anchor checkpoint")
    if (
        position.line > 1
        and record["kind"] == RecordKind.CHECKPOINT
        and record["reason"] == CheckpointReason.ANCHOR
    ):
        raise fail("an anchor checkpoint appears inside a segment")
    state.expected_seq = seq + 1
    state.prev_hash = record_hash(raw)


def _check_checkpoint(state: _ChainState, record: dict[str, Any], position: _Position) -> None:
    def fail(message: str) -> VerificationError:
        return VerificationError(
            message, segment=position.segment, line=position.line, seq=position.seq
        )

    if record["reason"] not in set(CheckpointReason):
        raise fail(f"checkpoint reason {record['reason']!r} is unknown")
    if record["segment"] != position.segment:
        raise fail(f"checkpoint names segment {record['segment']!r}; it was moved or copied")
    public_key = state.keys.get(str(record["key_id"]))
    if public_key is None:
        raise fail(
            f"checkpoint is signed by key {record['key_id']!r}, which is not trusted; it is "
            "forged, or pass the right key with --key"
        )
    if not signature_is_valid(record, public_key):
        raise fail(f"checkpoint signature is invalid for key {record['key_id']!r}; it is forged")
    state.last_checkpoint = position
    state.since_checkpoint = 0


def _verify_segment(state: _ChainState, path: Path, *, newest: bool) -> None:
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()
    if not lines and not tail:
        raise VerificationError("segment is empty", segment=path.name, line=1, seq=None)
    for number, raw in enumerate(lines, start=1):
        position = _Position(path.name, number, None)
        record = _parse(raw, position)
        position = _Position(path.name, number, record["seq"])
        _check_link(state, record, raw, position)
        witnessed = state.witnesses.get(record["seq"])
        if witnessed is not None and witnessed != record_hash(raw):
            raise VerificationError(
                f"hash {record_hash(raw)} differs from the witnessed {witnessed}; the record "
                "was replaced",
                segment=path.name,
                line=number,
                seq=record["seq"],
            )
        state.records += 1
        state.since_checkpoint += 1
        if state.since_checkpoint == 1:
            state.first_unsigned = position
        if record["kind"] == RecordKind.CHECKPOINT:
            _check_checkpoint(state, record, position)
        elif record["kind"] == RecordKind.RETENTION:
            state.first_retained_seq = record["first_retained_seq"]
            state.retention_position = position
        state.previous = position
        state.last_record = record
    if tail:
        raise VerificationError(
            "incomplete last record (no newline); the file was truncated or the sink crashed "
            "while writing",
            segment=path.name,
            line=len(lines) + 1,
            seq=None,
        )
    last = state.last_record
    if not newest and (
        last is None
        or last["kind"] != RecordKind.CHECKPOINT
        or last["reason"] != CheckpointReason.SEGMENT_END
    ):
        raise VerificationError(
            "segment does not end with its segment_end checkpoint; it was truncated",
            segment=path.name,
            line=len(lines),
            seq=last["seq"] if last else None,
        )


def _check_start(state: _ChainState, first: Path) -> bool:
    """Check that the log starts where it may; return whether it starts at the genesis."""
    assert state.first_seq is not None
    if state.first_seq == 1 and state.first_prev == GENESIS_HASH:
        return True
    if state.first_retained_seq is None:
        raise VerificationError(
            f"the log starts at seq {state.first_seq}, but no retention record explains the "
            "missing records before it; older segments were deleted",
            segment=first.name,
            line=1,
            seq=state.first_seq,
        )
    if state.first_seq > state.first_retained_seq:
        assert state.retention_position is not None
        raise VerificationError(
            f"the log starts at seq {state.first_seq}, but the retention record at "
            f"{state.retention_position.segment} line {state.retention_position.line} keeps "
            f"every record from seq {state.first_retained_seq}; segments were deleted",
            segment=first.name,
            line=1,
            seq=state.first_seq,
        )
    return False


def verify_directory(
    directory: Path,
    keys: Iterable[Ed25519PublicKey],
    *,
    allow_unsigned_tail: bool = False,
    witnesses: dict[int, str] | None = None,
) -> VerificationReport:
    """Verify every segment in `directory` with the trusted verification `keys`.

    Raises VerificationError at the first bad record, and ValueError when the folder contains no
    segment. An unsigned tail (records after the newest checkpoint) is an error unless
    `allow_unsigned_tail`, which suits a log that the sink is still writing. `witnesses` maps
    a seq to the SHA-256 of its record, as the sink logs them for checkpoints. Each one must be
    in the log unless retention pruned it.
    """
    segments = list_segments(directory)
    if not segments:
        raise ValueError(f"no audit segments (audit-*.jsonl) in {str(directory)!r}")
    return verify_segments(
        segments, keys, allow_unsigned_tail=allow_unsigned_tail, witnesses=witnesses
    )


def verify_segments(
    segments: list[Path],
    keys: Iterable[Ed25519PublicKey],
    *,
    allow_unsigned_tail: bool = False,
    check_start: bool = True,
    witnesses: dict[int, str] | None = None,
) -> VerificationReport:
    """Verify consecutive `segments`, oldest first, like `verify_directory`.

    With `check_start` false, the first segment may start anywhere in the log, which suits
    checking the newest segment alone.
    """
    state = _ChainState({key_id(key): key for key in keys}, witnesses or {})
    for index, path in enumerate(segments):
        _verify_segment(state, path, newest=index == len(segments) - 1)
    complete = _check_start(state, segments[0]) if check_start else False
    assert state.last_checkpoint is not None and state.previous is not None
    assert state.first_seq is not None and state.expected_seq is not None
    beyond = [seq for seq in state.witnesses if seq >= state.expected_seq]
    if beyond:
        raise VerificationError(
            f"the log ends here, but a record with seq {max(beyond)} was witnessed; records "
            "were cut off the end",
            segment=state.previous.segment,
            line=state.previous.line,
            seq=state.previous.seq,
        )
    if state.since_checkpoint and not allow_unsigned_tail:
        assert state.first_unsigned is not None
        raise VerificationError(
            f"this record and the {state.since_checkpoint - 1} after it follow the last "
            f"checkpoint (seq {state.last_checkpoint.seq} in {state.last_checkpoint.segment}) "
            "and are not signed; the log was truncated, or the sink stopped without its final "
            "checkpoint (pass --allow-unsigned-tail for a log the sink is still writing)",
            segment=state.first_unsigned.segment,
            line=state.first_unsigned.line,
            seq=state.first_unsigned.seq,
        )
    return VerificationReport(
        segments=len(segments),
        records=state.records,
        first_seq=state.first_seq,
        last_seq=state.expected_seq - 1,
        last_checkpoint_seq=state.last_checkpoint.seq or 0,
        unsigned_tail=state.since_checkpoint,
        complete=complete,
    )
