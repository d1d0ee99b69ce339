"""Tests of `agent-runner audit tail` and `keygen` on folders written by the real writer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from typer.testing import CliRunner

from libs.common import audit_tail
from libs.common.audit_records import CheckpointSigner, write_public_key
from libs.common.cli import app
from services.audit.segments import SegmentWriter
from tests.unit.audit.support import SUBJECT, make_event, write_log

HOSTILE = "\x1b]0;owned\x07\x1b[2J\rforged line\u202eevil"


def test_tail_shows_escapes_as_text(tmp_path: Path, signer: CheckpointSigner) -> None:
    writer = SegmentWriter(tmp_path, signer=signer, segment_max_bytes=1 << 20, recent_ids=1000)
    writer.open()
    event = make_event(1)
    event["details"] = {"path": HOSTILE}
    writer.add_event(stream_seq=1, subject=SUBJECT, event=event)
    writer.add_invalid(stream_seq=2, subject="audit.x.y", data=HOSTILE.encode(), error="bad")
    writer.close()

    result = CliRunner().invoke(app, ["audit", "tail", str(tmp_path)])

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    assert "\r" not in result.stdout
    assert "\u202e" not in result.stdout
    assert "\x07" not in result.stdout
    assert "api.auth.attempt success actor=client-1" in result.stdout
    assert "checkpoint stop" in result.stdout


def test_tail_prints_newest_lines(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=50, segment_max_bytes=4096)

    result = CliRunner().invoke(app, ["audit", "tail", str(tmp_path), "--lines", "3"])

    lines = result.stdout.splitlines()
    assert result.exit_code == 0, result.output
    assert len(lines) == 3
    assert "actor=client-50" in lines[1]
    assert "checkpoint stop" in lines[2]


def test_tail_missing_folder_fails(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "tail", str(tmp_path / "absent")])

    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_keygen_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    first = CliRunner().invoke(app, ["audit", "keygen", str(path)])
    before = path.read_bytes()

    second = CliRunner().invoke(app, ["audit", "keygen", str(path)])

    assert first.exit_code == 0, first.output
    assert "verification key:" in first.stdout
    assert second.exit_code == 2
    assert "exists" in second.stderr
    assert path.read_bytes() == before


def test_verify_without_key_fails(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=2)

    result = CliRunner().invoke(app, ["audit", "verify", str(tmp_path)])

    assert result.exit_code == 2
    assert "no verification key" in result.stderr


def test_verify_uses_folder_key_with_warning(tmp_path: Path, signer: CheckpointSigner) -> None:
    write_log(tmp_path, signer, events=2)
    write_public_key(tmp_path, signer.public_key)

    result = CliRunner().invoke(app, ["audit", "verify", str(tmp_path)])

    assert result.exit_code == 0, result.output
    assert "warning: using the verification keys stored in" in result.stderr


def test_follow_yields_new_records(tmp_path: Path, signer: CheckpointSigner) -> None:
    writer = SegmentWriter(tmp_path, signer=signer, segment_max_bytes=2048, recent_ids=1000)
    writer.open()
    _, segment, offset = audit_tail.last_lines(tmp_path, 0)
    seen: list[bytes] = []

    def append() -> None:
        for number in range(1, 21):
            writer.add_event(stream_seq=number, subject=SUBJECT, event=make_event(number))
            writer.sync()
            writer.rotate_if_full()

    thread = threading.Thread(target=append)
    thread.start()
    deadline = time.monotonic() + 20
    for raw in audit_tail.follow(
        tmp_path, segment, offset, should_stop=lambda: time.monotonic() > deadline
    ):
        seen.append(raw)
        if b"client-20" in raw:
            break
    thread.join()
    writer.close()

    events = [line for line in seen if b'"kind":"event"' in line]
    assert len(events) == 20
    assert b'client-1"' in events[0]
    assert any(b'"reason":"segment_end"' in line for line in seen)
