"""Hostile agent output through the real supervisor, Redis and gateway.

The agent prints terminal escapes, a carriage return that would hide text, a forged log line,
invalid UTF-8, secrets, a 10 MB line and a flood of lines, then serves HTTP. The test reads
what Redis stored and what the gateway shows, the counts, and the audit events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from libs.common.apikeys import generate_key
from libs.common.messages import LogLine
from libs.common.settings import CommonSettings, load_settings
from libs.common.store import connect_redis
from services.supervisor.agent_logs import counts_key, lines_key
from tests.integration.conftest import Tarball, make_tarball, trusted_sources
from tests.support.audit_sink import create_signing_key
from tests.support.images import build_busybox_image
from tests.support.stack import VENV_BIN, FileServer, Stack, running_stack

pytestmark = pytest.mark.integration

MAX_LINE_LENGTH = 1000
FINAL_RECORD_TTL = 7 * 24 * 3600  # the supervisor's default --final-record-ttl
BURST = 40
FLOOD = 2000
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"

# Each printf writes one line unless noted. `\033` is ESC, `\007` BEL, `\377` and `\300\257`
# are invalid UTF-8. The sleep lets the log collector read the hostile lines before the
# flood empties the rate-limit bucket, because stdout and stderr share one bucket.
HOSTILE_SCRIPT = rf"""#!/bin/sh
printf '\033[31mred\033[0m \033[2J\033[H\033[1A\033[2Kcursor\n'
printf '\033]0;pwned title\007\033]8;;http://198.51.100.7/\033\\click\033]8;;\033\\\n'
printf 'harmless progress 10%%\rERROR: text that hides the start of the line\n'
printf 'real output\n2026-12-05T00:00:00Z supervisor INFO agent approved by operator\n'
printf 'bad bytes \377\376 \300\257 end\n'
printf 'aws key AKIAIOSFODNN7EXAMPLE\n' >&2
printf 'Authorization: Bearer abc123def456ghi789\n' >&2
printf -- '-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAx\nabcdEFGH+/==\n'
printf -- '-----END RSA PRIVATE KEY-----\n'
printf 'api key %s\n' "$LEAKED_KEY"
printf 'session {JWT}\n'
head -c 10000000 /dev/zero | tr '\000' A
printf '\n'
sleep 2
i=0
while [ $i -lt {FLOOD} ]; do echo "flood line $i"; i=$((i+1)); done
exec busybox httpd -f -p 80 -h /www
"""
# Lines before the flood: printf calls with two lines (the forged one, the key block's first
# three) count twice.
HOSTILE_LINES = 15
REDACTED_LINES = 6  # AWS key id, bearer token, two key block lines, API key, JWT


def remove_image(client: docker.DockerClient, image_id: str) -> None:
    """Remove an image that a stack loaded again from its tarball, under the same ID."""
    with contextlib.suppress(docker.errors.NotFound):
        client.images.remove(image_id, force=True)


@pytest.fixture(scope="module")
def hostile_tarball(docker_client: docker.DockerClient, served: FileServer) -> Iterator[Tarball]:
    image_id = build_busybox_image(
        docker_client,
        entrypoint=["/hostile.sh"],
        cmd=None,
        extra_files={
            "hostile.sh": HOSTILE_SCRIPT.encode(),
            "www/index.html": b"<p>hostile agent</p>\n",
        },
    )
    yield make_tarball(docker_client, served, image_id, "hostile.tar")
    remove_image(docker_client, image_id)


@pytest.fixture(scope="module")
def logs_stack(tmp_path_factory: pytest.TempPathFactory, served: FileServer) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("logs-stack"),
        network="agent-runner-logs",
        subnet="172.29.50.0/24",
        bridge="ar-logs0",
        supervisor_args=[
            "--agent-start-timeout=30",
            "--agent-stop-grace=2",
            f"--log-max-line-length={MAX_LINE_LENGTH}",
            # One token per 1000 s: no refill during the test, so exactly BURST lines pass.
            "--log-rate-limit=0.001",
            f"--log-rate-burst={BURST}",
            "--container-log-max-size=64MiB",
            *trusted_sources(served.url("")),
        ],
    ) as running:
        yield running


@pytest.fixture
def logs_api(logs_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=logs_stack.api_url, headers=logs_stack.headers, timeout=60
    ) as client:
        yield client


def delete_log_keys(agent_id: str) -> None:
    """Remove an agent's log from the shared Redis."""

    async def delete() -> None:
        client = connect_redis(load_settings(CommonSettings, []))
        try:
            await client.delete(lines_key(agent_id), counts_key(agent_id))
        finally:
            await client.aclose()

    asyncio.run(delete())


def stored_records(agent_id: str) -> tuple[list[LogLine], dict[str, str]]:
    """Return the log records and counts that the supervisor wrote to Redis."""

    async def read() -> tuple[list[LogLine], dict[str, str]]:
        client = connect_redis(load_settings(CommonSettings, []))
        try:
            raws = await client.lrange(lines_key(agent_id), 0, -1)
            counts = await client.hgetall(counts_key(agent_id))
            records = [LogLine.model_validate_json(raw) for raw in raws]
            return records, {str(name): str(value) for name, value in counts.items()}
        finally:
            await client.aclose()

    return asyncio.run(read())


def log_key_ttls(agent_id: str) -> list[int]:
    """Return the seconds until the agent's log keys expire."""

    async def read() -> list[int]:
        client = connect_redis(load_settings(CommonSettings, []))
        try:
            return [
                int(await client.ttl(key)) for key in (lines_key(agent_id), counts_key(agent_id))
            ]
        finally:
            await client.aclose()

    return asyncio.run(read())


def wait_for_logs(api: httpx.Client, agent_id: str, *, lines: int) -> dict[str, Any]:
    """Poll the logs route until the counts show `lines` lines read; return the response."""
    deadline = time.monotonic() + 60
    while True:
        body: dict[str, Any] = api.get(f"/v1/agents/{agent_id}/logs", params={"tail": 500}).json()
        counts = body.get("counts") or {}
        if counts.get("lines") == lines and counts.get("stored") == BURST:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"log of {agent_id} did not reach {lines} lines: {counts}")
        time.sleep(0.2)


def texts(lines: list[dict[str, Any]]) -> list[str]:
    return [line["text"] for line in lines]


def check_hostile_lines(lines: list[dict[str, Any]], *, agent_id: str, container_id: str) -> None:
    for line in lines:
        assert line["agent_id"] == agent_id
        assert line["container_id"] == container_id
        controls = [c for c in line["text"] if unicodedata.category(c) == "Cc" and c != "\t"]
        assert controls == [], line

    # The collector reads stdout and stderr in parallel, so only each stream keeps its order.
    stdout = [line for line in lines if line["stream"] == "stdout"]
    stderr = [line for line in lines if line["stream"] == "stderr"]
    shown = texts(stdout)
    assert shown[0] == "\\x1b[31mred\\x1b[0m \\x1b[2J\\x1b[H\\x1b[1A\\x1b[2Kcursor"
    assert shown[1] == (
        "\\x1b]0;pwned title\\x07\\x1b]8;;http://198.51.100.7/\\x1b\\click\\x1b]8;;\\x1b\\"
    )
    assert shown[2] == "harmless progress 10%\\rERROR: text that hides the start of the line"
    assert shown[3] == "real output"
    # The forged line is a record of its own from the agent's stdout, not the supervisor's.
    assert shown[4] == "2026-12-05T00:00:00Z supervisor INFO agent approved by operator"
    assert shown[5] == "bad bytes \ufffd\ufffd \ufffd\ufffd end"
    assert shown[6:10] == [
        "-----BEGIN RSA PRIVATE KEY-----",
        "[REDACTED:private_key]",
        "[REDACTED:private_key]",
        "-----END RSA PRIVATE KEY-----",
    ]
    assert shown[10] == "api key [REDACTED:agent_runner_api_key]"
    assert shown[11] == "session [REDACTED:jwt]"
    assert shown[12] == "A" * MAX_LINE_LENGTH + " [truncated]"
    assert stdout[12]["truncated"] is True
    assert shown[13:] == [f"flood line {n}" for n in range(BURST - HOSTILE_LINES)]
    assert texts(stderr) == [
        "aws key [REDACTED:aws_access_key_id]",
        "Authorization: Bearer [REDACTED:bearer_token]",
    ]

    assert [line for line in lines if line["truncated"]] == [stdout[12]]
    assert sum(line["redactions"] for line in lines) == REDACTED_LINES


def test_hostile_output_stored_and_shown_safely(
    logs_api: httpx.Client, logs_stack: Stack, hostile_tarball: Tarball
) -> None:
    leaked_key = generate_key()
    response = logs_api.post(
        "/v1/agents",
        params={"wait": "true"},
        json={
            "image_url": hostile_tarball.url,
            "image_digest": hostile_tarball.digest,
            "env": {"LEAKED_KEY": leaked_key},
        },
    )
    assert response.status_code == 202, response.text
    agent = response.json()
    assert agent["state"] == "ready", agent
    agent_id = agent["agent_id"]
    container_id = agent["container_id"]
    try:
        check_agent_log(logs_api, logs_stack, agent_id, container_id, leaked_key=leaked_key)
    finally:
        delete_log_keys(agent_id)


def check_agent_log(
    logs_api: httpx.Client, logs_stack: Stack, agent_id: str, container_id: str, *, leaked_key: str
) -> None:
    total = HOSTILE_LINES + FLOOD
    expected_counts = {
        "lines": total,
        "stored": BURST,
        "dropped": total - BURST,
        "truncated": 1,
        "redacted": REDACTED_LINES,
    }

    live = wait_for_logs(logs_api, agent_id, lines=total)
    assert live["counts"] == expected_counts
    check_hostile_lines(live["lines"], agent_id=agent_id, container_id=container_id)
    # The collector writes its counts to Redis with each batch, at least twice a second.
    deadline = time.monotonic() + 5
    while True:
        stored, stored_counts = stored_records(agent_id)
        counts = {name: int(stored_counts[name]) for name in expected_counts}
        if counts == expected_counts or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counts == expected_counts
    assert [line.model_dump(mode="json") for line in stored] == live["lines"]
    # While the agent runs, its log outlives the longest lifetime and then the final TTL.
    assert all(ttl > FINAL_RECORD_TTL for ttl in log_key_ttls(agent_id))

    stopped = logs_api.delete(f"/v1/agents/{agent_id}")
    assert stopped.status_code == 200
    kept = logs_api.get(f"/v1/agents/{agent_id}/logs", params={"tail": 500})
    assert kept.status_code == 200
    assert all(0 < ttl <= FINAL_RECORD_TTL for ttl in log_key_ttls(agent_id))
    assert kept.json()["lines"] == live["lines"]
    assert kept.json()["counts"] == expected_counts
    assert leaked_key not in kept.text
    assert "AKIAIOSFODNN7EXAMPLE" not in kept.text
    assert "\\u001b" not in kept.text  # JSON's escape for a raw ESC

    supervisor_log = logs_stack.log_text("supervisor")
    assert leaked_key not in supervisor_log
    assert "AKIAIOSFODNN7EXAMPLE" not in supervisor_log

    events = logs_stack.audit_events(agent_id)
    drops = [event for event in events if event["type"] == "agent.logs_dropped"]
    assert drops, [event["type"] for event in events]
    assert sum(event["details"]["dropped"] for event in drops) == total - BURST
    for event in drops:
        assert event["schema_version"] == 1
        assert event["service"] == "supervisor"
        assert event["host"] == logs_stack.host_id
        assert event["outcome"] == "denied"
        assert event["reason_code"] == "log_rate_limited"
        assert event["details"]["container_id"] == container_id
    assert drops[-1]["details"]["dropped_total"] == total - BURST
    types = [event["type"] for event in events]
    assert types.index("agent.started") < types.index("agent.logs_dropped")
    assert types.index("agent.logs_dropped") < types.index("agent.stopped")
    assert len({event["event_id"] for event in events}) == len(events)
    check_audit_chain(logs_stack, agent_id, expected_drops=len(drops))


def check_audit_chain(stack: Stack, agent_id: str, *, expected_drops: int) -> None:
    """Write the stack's audit stream with the real sink and verify the signed chain."""
    folder = stack.workdir / f"audit-{agent_id}"
    folder.mkdir()
    public_key = create_signing_key(folder / "signing.pem")
    records = folder / "records"
    log = (folder / "sink.log").open("ab")
    sink = subprocess.Popen(
        [
            VENV_BIN / "agent-runner-audit",
            f"--audit-dir={records}",
            f"--audit-signing-key={folder / 'signing.pem'}",
            f"--audit-consumer=logs-{agent_id}",
        ],
        env=stack.env(),
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while drop_records(records) < expected_drops:
            assert sink.poll() is None, (folder / "sink.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sink did not write the drop events in 30 s"
            time.sleep(0.2)
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=30)
        log.close()

    verified = subprocess.run(
        [VENV_BIN / "agent-runner", "audit", "verify", str(records), "--key", str(public_key)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    written = [
        json.loads(line)
        for path in sorted(records.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    raw = "".join(path.read_text() for path in records.glob("*.jsonl"))
    assert "\x1b" not in raw
    assert "\r" not in raw
    assert drop_records(records) == expected_drops
    assert {record["kind"] for record in written} >= {"checkpoint"}


def drop_records(records: Path) -> int:
    """Return how many agent.logs_dropped events the sink wrote to `records` so far."""
    return sum(
        1
        for path in records.glob("*.jsonl")
        for line in path.read_text().splitlines()
        if json.loads(line).get("event", {}).get("type") == "agent.logs_dropped"
    )


QUIET_SCRIPT = b"""#!/bin/sh
echo "before restart"
exec busybox httpd -f -p 80 -h /www
"""


@pytest.fixture(scope="module")
def quiet_tarball(docker_client: docker.DockerClient, served: FileServer) -> Iterator[Tarball]:
    image_id = build_busybox_image(
        docker_client,
        entrypoint=["/quiet.sh"],
        cmd=None,
        extra_files={"quiet.sh": QUIET_SCRIPT, "www/index.html": b"<p>quiet agent</p>\n"},
    )
    yield make_tarball(docker_client, served, image_id, "quiet.tar")
    remove_image(docker_client, image_id)


def print_in_agent(container: Any, text: str) -> None:
    """Make the agent's main process print `text`, as if the agent wrote it itself."""
    result = container.exec_run(["sh", "-c", f"echo '{text}' > /proc/1/fd/1"])
    assert result.exit_code == 0, result.output


def wait_for_texts(api: httpx.Client, agent_id: str, expected: list[str]) -> dict[str, Any]:
    """Poll the logs route until it shows exactly the lines `expected`; return the response."""
    deadline = time.monotonic() + 30
    while True:
        body: dict[str, Any] = api.get(f"/v1/agents/{agent_id}/logs").json()
        if texts(body["lines"]) == expected:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"log of {agent_id} is {texts(body['lines'])}, not {expected}")
        time.sleep(0.2)


def test_log_resumes_after_supervisor_restart(
    logs_api: httpx.Client,
    logs_stack: Stack,
    quiet_tarball: Tarball,
    docker_client: docker.DockerClient,
) -> None:
    response = logs_api.post(
        "/v1/agents",
        params={"wait": "true"},
        json={"image_url": quiet_tarball.url, "image_digest": quiet_tarball.digest},
    )
    assert response.status_code == 202, response.text
    agent = response.json()
    assert agent["state"] == "ready", agent
    agent_id = agent["agent_id"]
    container = docker_client.containers.get(agent["container_id"])
    try:
        wait_for_texts(logs_api, agent_id, ["before restart"])

        logs_stack.stop_service("supervisor")
        print_in_agent(container, "during restart")
        logs_stack.start_supervisor()
        print_in_agent(container, "after restart")

        expected = ["before restart", "during restart", "after restart"]
        body = wait_for_texts(logs_api, agent_id, expected)
        assert body["counts"] == {
            "lines": 3,
            "stored": 3,
            "dropped": 0,
            "truncated": 0,
            "redacted": 0,
        }
        assert logs_api.delete(f"/v1/agents/{agent_id}").status_code == 200
        assert texts(logs_api.get(f"/v1/agents/{agent_id}/logs").json()["lines"]) == expected
    finally:
        delete_log_keys(agent_id)
