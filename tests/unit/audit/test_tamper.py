"""Tamper tests: every kind of change to an audit folder is detected and located."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from libs.common.audit_records import (
    CheckpointSigner,
    canonical_bytes,
    list_segments,
    public_key_pem,
    record_hash,
)
from libs.common.audit_verify import VerificationError, verify_directory
from libs.common.cli import app
from tests.unit.audit.support import write_log


@pytest.fixture
def log_dir(tmp_path: Path, signer: CheckpointSigner) -> Path:
    directory = tmp_path / "audit"
    write_log(directory, signer, events=30, checkpoint_every=10)
    return directory


def lines_of(directory: Path) -> tuple[Path, list[bytes]]:
    segment = list_segments(directory)[0]
    return segment, segment.read_bytes().splitlines(keepends=True)


def verify_error(directory: Path, signer: CheckpointSigner) -> VerificationError:
    with pytest.raises(VerificationError) as caught:
        verify_directory(directory, [signer.public_key])
    return caught.value


def line_of_seq(lines: list[bytes], seq: int) -> int:
    """Return the 0-based index of the record with `seq`."""
    for index, line in enumerate(lines):
        if json.loads(line)["seq"] == seq:
            return index
    raise AssertionError(f"no record with seq {seq}")


def test_untouched_log_verifies(log_dir: Path, signer: CheckpointSigner) -> None:
    report = verify_directory(log_dir, [signer.public_key])

    assert report.complete
    assert report.first_seq == 1
    assert report.unsigned_tail == 0
    # 30 events, an anchor, 3 interval checkpoints and the stop checkpoint.
    assert report.records == 35


def test_edited_byte_is_located(log_dir: Path, signer: CheckpointSigner) -> None:
    segment, lines = lines_of(log_dir)
    index = line_of_seq(lines, 7)
    lines[index] = lines[index].replace(b"client-", b"client_", 1)
    segment.write_bytes(b"".join(lines))

    error = verify_error(log_dir, signer)

    assert error.segment == segment.name
    assert error.line == index + 1
    assert error.seq == 7
    assert "was changed" in error.reason


def test_edit_that_breaks_json_is_located(log_dir: Path, signer: CheckpointSigner) -> None:
    segment, lines = lines_of(log_dir)
    index = line_of_seq(lines, 12)
    lines[index] = lines[index][:20] + b"\x00" + lines[index][21:]
    segment.write_bytes(b"".join(lines))

    error = verify_error(log_dir, signer)

    assert error.line == index + 1
    assert "not valid JSON" in error.reason


def test_deleted_record_is_located(log_dir: Path, signer: CheckpointSigner) -> None:
    segment, lines = lines_of(log_dir)
    index = line_of_seq(lines, 9)
    del lines[index]
    segment.write_bytes(b"".join(lines))

    error = verify_error(log_dir, signer)

    assert error.line == index + 1
    assert error.seq == 10
    assert "deleted, inserted or reordered" in error.reason


def test_swapped_records_are_located(log_dir: Path, signer: CheckpointSigner) -> None:
    segment, lines = lines_of(log_dir)
    index = line_of_seq(lines, 15)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    segment.write_bytes(b"".join(lines))

    error = verify_error(log_dir, signer)

    assert error.line == index + 1
    assert error.seq == 16
    assert "deleted, inserted or reordered" in error.reason


def test_inserted_record_is_located(log_dir: Path, signer: CheckpointSigner) -> None:
    segment, lines = lines_of(log_dir)
    index = line_of_seq(lines, 20)
    lines.insert(index, lines[index])
    segment.write_bytes(b"".join(lines))

    error = verify_error(log_dir, signer)

    assert error.line == index + 2
    assert error.seq == 20


def test_rechained_edit_is_caught_by_checkpoint(log_dir: Path, signer: CheckpointSigner) -> None:
    """An edit whose hashes are recomputed still fails at the next signed checkpoint."""
    segment, lines = lines_of(log_dir)
    index = line_of_seq(lines, 4)
    records = [json.loads(line) for line in lines]
    records[index]["event"]["actor"] = "someone-else"
    for position in range(index + 1, len(records)):
        previous = canonical_bytes(records[position - 1])
        records[position]["prev"] = record_hash(previous)
    segment.write_bytes(b"".join(canonical_bytes(record) + b"\n" for record in records))

    error = verify_error(log_dir, signer)

    assert error.seq is not None and error.seq > 4
    assert json.loads(lines[error.line - 1])["kind"] == "checkpoint"
    assert "forged" in error.reason


def test_truncated_record_is_located(log_dir: Path, signer: CheckpointSigner) -> None:
    segment, lines = lines_of(log_dir)
    data = b"".join(lines)
    segment.write_bytes(data[: len(data) - 40])

    error = verify_error(log_dir, signer)

    assert error.line == len(lines)
    assert "incomplete last record" in error.reason


def test_removed_tail_records_are_located(log_dir: Path, signer: CheckpointSigner) -> None:
    segment, lines = lines_of(log_dir)
    # Cutting the stop checkpoint, the interval checkpoint before it and the last event
    # leaves the events after the previous checkpoint unsigned.
    remaining = lines[: len(lines) - 3]
    segment.write_bytes(b"".join(remaining))
    last_checkpoint = max(
        index for index, line in enumerate(remaining) if json.loads(line)["kind"] == "checkpoint"
    )

    error = verify_error(log_dir, signer)

    assert error.line == last_checkpoint + 2
    assert "not signed" in error.reason


def test_forged_checkpoint_is_located(log_dir: Path, signer: CheckpointSigner) -> None:
    segment, lines = lines_of(log_dir)
    index = line_of_seq(lines, 12)
    checkpoint = json.loads(lines[index])
    assert checkpoint["kind"] == "checkpoint"
    forger = CheckpointSigner(Ed25519PrivateKey.generate())
    unsigned = {
        name: value for name, value in checkpoint.items() if name not in ("key_id", "signature")
    }
    lines[index] = canonical_bytes(forger.sign(unsigned)) + b"\n"
    segment.write_bytes(b"".join(lines))

    error = verify_error(log_dir, signer)

    assert error.line == index + 1
    assert "not trusted" in error.reason


def test_checkpoint_claiming_real_key_is_located(log_dir: Path, signer: CheckpointSigner) -> None:
    segment, lines = lines_of(log_dir)
    index = line_of_seq(lines, 12)
    checkpoint = json.loads(lines[index])
    forger = CheckpointSigner(Ed25519PrivateKey.generate())
    unsigned = {name: value for name, value in checkpoint.items() if name != "signature"}
    forged = forger.sign(unsigned)
    forged["key_id"] = checkpoint["key_id"]
    lines[index] = canonical_bytes(forged) + b"\n"
    segment.write_bytes(b"".join(lines))

    error = verify_error(log_dir, signer)

    assert error.line == index + 1
    assert "signature is invalid" in error.reason


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("edit", "was changed"),
        ("truncate", "incomplete last record"),
    ],
)
def test_verify_command_names_bad_record(
    log_dir: Path, signer: CheckpointSigner, tmp_path: Path, damage: str, expected: str
) -> None:
    key = tmp_path / "trusted.pub"
    key.write_text(public_key_pem(signer.public_key))
    segment, lines = lines_of(log_dir)
    if damage == "edit":
        lines[3] = lines[3].replace(b"client-", b"client_", 1)
        segment.write_bytes(b"".join(lines))
    else:
        segment.write_bytes(b"".join(lines)[:-5])

    result = CliRunner().invoke(app, ["audit", "verify", str(log_dir), "--key", str(key)])

    assert result.exit_code == 1
    assert segment.name in result.stderr
    assert expected in result.stderr


def test_verify_command_passes_untouched_log(
    log_dir: Path, signer: CheckpointSigner, tmp_path: Path
) -> None:
    key = tmp_path / "trusted.pub"
    key.write_text(public_key_pem(signer.public_key))

    result = CliRunner().invoke(app, ["audit", "verify", str(log_dir), "--key", str(key)])

    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("ok: 35 records in 1 segment(s), from the first record")


def test_verify_command_rejects_other_key(log_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pub"
    other.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))

    result = CliRunner().invoke(app, ["audit", "verify", str(log_dir), "--key", str(other)])

    assert result.exit_code == 1
    assert "line 1 (seq 1)" in result.stderr
    assert "not trusted" in result.stderr


def cut_after_checkpoint(directory: Path) -> tuple[int, str]:
    """Cut the log after its second-to-last checkpoint; return the removed stop's witness."""
    segment, lines = lines_of(directory)
    stop = lines[-1].rstrip(b"\n")
    checkpoints = [
        index for index, line in enumerate(lines) if json.loads(line)["kind"] == "checkpoint"
    ]
    segment.write_bytes(b"".join(lines[: checkpoints[-2] + 1]))
    return json.loads(stop)["seq"], record_hash(stop)


def test_cut_at_checkpoint_needs_witness(log_dir: Path, signer: CheckpointSigner) -> None:
    seq, digest = cut_after_checkpoint(log_dir)

    report = verify_directory(log_dir, [signer.public_key])
    with pytest.raises(VerificationError, match="cut off the end") as caught:
        verify_directory(log_dir, [signer.public_key], witnesses={seq: digest})

    assert report.last_seq < seq
    assert caught.value.seq == report.last_seq


def test_witness_of_other_hash_fails(log_dir: Path, signer: CheckpointSigner) -> None:
    _, lines = lines_of(log_dir)
    stop = json.loads(lines[-1])

    with pytest.raises(VerificationError, match="differs from the witnessed") as caught:
        verify_directory(log_dir, [signer.public_key], witnesses={stop["seq"]: "a" * 64})

    assert caught.value.line == len(lines)


def test_verify_command_takes_witness(
    log_dir: Path, signer: CheckpointSigner, tmp_path: Path
) -> None:
    key = tmp_path / "trusted.pub"
    key.write_text(public_key_pem(signer.public_key))
    _, lines = lines_of(log_dir)
    stop = lines[-1].rstrip(b"\n")
    witness = f"{json.loads(stop)['seq']}:{record_hash(stop)}"
    command = ["audit", "verify", str(log_dir), "--key", str(key), "--witness"]

    passed = CliRunner().invoke(app, [*command, witness])
    cut_after_checkpoint(log_dir)
    failed = CliRunner().invoke(app, [*command, witness])
    invalid = CliRunner().invoke(app, [*command, "12:abc"])

    assert passed.exit_code == 0, passed.stderr
    assert failed.exit_code == 1
    assert "cut off the end" in failed.stderr
    assert invalid.exit_code == 2
    assert "--witness '12:abc' is invalid" in invalid.stderr
