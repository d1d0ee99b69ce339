"""The audit sink against a real nats-server with JetStream: crash safety and retention."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from libs.common import bus
from libs.common.audit import AuditPublisher
from libs.common.audit_records import list_segments
from libs.common.messages import AuditEvent, AuditOutcome
from tests.support.audit_sink import AuditSinkProcess, NatsServer, create_signing_key
from tests.support.stack import VENV_BIN

pytestmark = pytest.mark.integration

EVENTS_PER_SECOND = 400
PUBLISH_SECONDS = 6.0


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def public_key(tmp_path: Path) -> Path:
    return create_signing_key(tmp_path / "keys" / "audit-signing.pem")


@pytest.fixture
def sink(nats_server: NatsServer, tmp_path: Path, public_key: Path) -> Iterator[AuditSinkProcess]:
    process = AuditSinkProcess(
        nats_server,
        tmp_path / "audit",
        tmp_path / "keys" / "audit-signing.pem",
        "--audit-checkpoint-interval=1",
        "--audit-segment-max-bytes=200000",
    )
    yield process
    if process.process is not None:
        process.stop()


def stored_events(audit_dir: Path) -> list[dict[str, object]]:
    """Return the events in the folder, in file order."""
    events = []
    for segment in list_segments(audit_dir):
        for line in segment.read_bytes().splitlines():
            record = json.loads(line)
            if record["kind"] == "event":
                events.append(record["event"])
    return events


def last_witness(log: Path) -> str:
    """Return the seq:hash of the newest checkpoint that the sink logged."""
    messages = [str(json.loads(line)["message"]) for line in log.read_text().splitlines()]
    checkpoints = [message for message in messages if " checkpoint " in message]
    return checkpoints[-1].split()[3]


def verify(audit_dir: Path, public_key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            VENV_BIN / "agent-runner",
            "audit",
            "verify",
            str(audit_dir),
            "--key",
            str(public_key),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def publish_steadily(
    server: NatsServer, *, rate: int, seconds: float, during: asyncio.Event
) -> list[str]:
    """Emit `rate` events per second for `seconds` through AuditPublisher; return their ids."""
    client = await nats.connect(server.url, user="tests", password=server.password)
    try:
        publisher = AuditPublisher(
            await bus.ensure_audit_stream(client), service="loadtest", host="audit-test"
        )
        publisher.start()
        ids: list[str] = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) - len(ids)
            for _ in range(due):
                event = publisher.emit(
                    "load.tick",
                    outcome=AuditOutcome.INFO,
                    actor="tests",
                    details={"n": len(ids)},
                )
                ids.append(event.event_id)
            if elapsed > 1.5:
                during.set()
            await asyncio.sleep(0.01)
        await publisher.close(timeout=60)
        assert publisher.dropped == 0
        assert publisher.published == len(ids)
        return ids
    finally:
        await client.close()


async def publish_without_message_id(server: NatsServer, events: list[AuditEvent]) -> None:
    """Publish events without Nats-Msg-Id, so JetStream stores repeats instead of dropping them."""
    client = await nats.connect(server.url, user="tests", password=server.password)
    try:
        jetstream = await bus.ensure_audit_stream(client)
        for event in events:
            await jetstream.publish(event.subject, bus.encode(event))
    finally:
        await client.close()


def wait_for_events(audit_dir: Path, service: str, count: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([e for e in stored_events(audit_dir) if e["service"] == service]) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} {service} events stored after {timeout} s")


async def test_sigkill_loses_and_repeats_nothing(
    nats_server: NatsServer, sink: AuditSinkProcess, public_key: Path
) -> None:
    sink.start()
    kill_now = asyncio.Event()
    publishing = asyncio.create_task(
        publish_steadily(
            nats_server, rate=EVENTS_PER_SECOND, seconds=PUBLISH_SECONDS, during=kill_now
        )
    )
    await kill_now.wait()
    written_before_kill = len(stored_events(sink.audit_dir))
    for _ in range(2):
        assert await asyncio.to_thread(sink.stop, signal.SIGKILL) == -signal.SIGKILL
        await asyncio.sleep(0.5)
        await asyncio.to_thread(sink.start)
        await asyncio.sleep(1.0)
    assert not publishing.done()
    published = await publishing
    await asyncio.to_thread(wait_for_events, sink.audit_dir, "loadtest", len(published), timeout=60)
    assert await asyncio.to_thread(sink.stop) == 0

    stored = [event["event_id"] for event in stored_events(sink.audit_dir)]
    loadtest = [
        event["event_id"]
        for event in stored_events(sink.audit_dir)
        if event["service"] == "loadtest"
    ]
    assert written_before_kill > 0
    assert len(published) >= EVENTS_PER_SECOND * (PUBLISH_SECONDS - 1)
    assert loadtest == published
    assert len(stored) == len(set(stored))
    result = verify(sink.audit_dir, public_key, "--witness", last_witness(sink.log))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")
    assert "from the first record" in result.stdout
    assert "0 record(s) after it" in result.stdout


async def test_repeated_event_ids_stored_once(
    nats_server: NatsServer, sink: AuditSinkProcess, public_key: Path
) -> None:
    events = [
        AuditEvent(
            service="repeat",
            host="audit-test",
            type="load.tick",
            actor="tests",
            outcome=AuditOutcome.INFO,
        )
        for _ in range(5)
    ]
    sink.start()
    await publish_without_message_id(nats_server, events)
    await asyncio.to_thread(wait_for_events, sink.audit_dir, "repeat", 5, timeout=30)
    sink.stop()
    await publish_without_message_id(nats_server, events)
    sink.start()
    await publish_without_message_id(nats_server, events)
    await publish_without_message_id(
        nats_server, [events[0].model_copy(update={"event_id": uuid.uuid4().hex})]
    )
    await asyncio.to_thread(wait_for_events, sink.audit_dir, "repeat", 6, timeout=30)
    sink.stop()

    repeat = [
        event["event_id"] for event in stored_events(sink.audit_dir) if event["service"] == "repeat"
    ]
    assert repeat[:5] == [event.event_id for event in events]
    assert len(repeat) == 6
    assert "dropped a repeated audit message" in sink.log.read_text()
    assert verify(sink.audit_dir, public_key).returncode == 0


async def test_retention_keeps_log_verifiable(
    nats_server: NatsServer, tmp_path: Path, public_key: Path
) -> None:
    audit_dir = tmp_path / "audit"
    sink = AuditSinkProcess(
        nats_server,
        audit_dir,
        tmp_path / "keys" / "audit-signing.pem",
        "--audit-segment-max-bytes=20000",
        "--audit-max-size=60000",
    )
    sink.start()
    try:
        ids = await publish_steadily(nats_server, rate=1000, seconds=2.0, during=asyncio.Event())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            events = stored_events(audit_dir)
            if events and events[-1]["event_id"] == ids[-1]:
                break
            await asyncio.sleep(0.2)
    finally:
        sink.stop()

    segments = list_segments(audit_dir)
    total = sum(path.stat().st_size for path in segments)
    result = verify(audit_dir, public_key)
    assert result.returncode == 0, result.stderr
    assert "from retained seq" in result.stdout
    assert total <= 60000 + 20000 + 4096 * 2
    assert stored_events(audit_dir)[-1]["event_id"] == ids[-1]
    assert "retention deleted" in sink.log.read_text()


def run_sink(nats_server: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the sink to completion; for start-up errors, which end it at once."""
    return subprocess.run(
        [VENV_BIN / "agent-runner-audit", *args],
        env=nats_server.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_production_requires_key(nats_server: NatsServer, tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"

    result = run_sink(nats_server, f"--audit-dir={audit_dir}")

    assert result.returncode == 2
    assert "--audit-signing-key is required" in result.stderr
    assert "agent-runner audit keygen" in result.stderr
    assert not audit_dir.exists()


def test_damaged_log_is_not_continued(
    nats_server: NatsServer, sink: AuditSinkProcess, public_key: Path
) -> None:
    sink.start()
    sink.stop()
    segment = list_segments(sink.audit_dir)[-1]
    damaged = segment.read_bytes().replace(b'"reason":"anchor"', b'"reason":"ANCHOR"', 1)
    segment.write_bytes(damaged)

    result = run_sink(
        nats_server, f"--audit-dir={sink.audit_dir}", f"--audit-signing-key={sink.key}"
    )

    assert result.returncode == 1
    assert "fails verification" in result.stderr
    assert f"{segment.name} line 1" in result.stderr
    assert segment.read_bytes() == damaged
    assert len(list_segments(sink.audit_dir)) == 1


def test_second_sink_on_folder_is_refused(nats_server: NatsServer, sink: AuditSinkProcess) -> None:
    sink.start()

    result = run_sink(
        nats_server, f"--audit-dir={sink.audit_dir}", f"--audit-signing-key={sink.key}"
    )
    sink.stop()

    assert result.returncode == 2
    assert "locked by another audit sink" in result.stderr
    reasons = [
        json.loads(line).get("reason")
        for segment in list_segments(sink.audit_dir)
        for line in segment.read_bytes().splitlines()
    ]
    # A second writer would have added its own start checkpoint.
    assert "start" not in reasons
    assert reasons.count("stop") == 1


async def test_invalid_messages_are_kept(
    nats_server: NatsServer, sink: AuditSinkProcess, public_key: Path
) -> None:
    sink.start()
    client = await nats.connect(nats_server.url, user="tests", password=nats_server.password)
    try:
        jetstream = await bus.ensure_audit_stream(client)
        await jetstream.publish("audit.api.auth.failed", b"\x1b[2J not json \xff")
        spoofed = AuditEvent(
            service="netguard",
            host="audit-test",
            type="firewall.applied",
            actor="someone",
            outcome=AuditOutcome.SUCCESS,
        )
        await jetstream.publish("audit.api.auth.failed", bus.encode(spoofed))
    finally:
        await client.close()
    deadline = time.monotonic() + 30
    invalid: list[dict[str, object]] = []
    while time.monotonic() < deadline and len(invalid) < 2:
        await asyncio.sleep(0.2)
        invalid = [
            json.loads(line)
            for segment in list_segments(sink.audit_dir)
            for line in segment.read_bytes().splitlines()
            if json.loads(line)["kind"] == "invalid"
        ]
    sink.stop()

    assert len(invalid) == 2
    assert invalid[0]["data"] == "\x1b[2J not json \ufffd"
    assert "arrived on 'audit.api.auth.failed'" in str(invalid[1]["error"])
    assert verify(sink.audit_dir, public_key).returncode == 0
