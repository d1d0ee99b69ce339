"""Tests for the log collector's stored counts, its settings and the log message fields.

The collector itself runs against real Docker and Redis in
tests/integration/test_agent_logs.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from libs.common.errors import ConfigurationError, StoreError
from libs.common.messages import LogCounts, LogLine, LogsReply, LogStream
from libs.common.settings import load_settings
from services.supervisor.agent_logs import _Counts, _counts_from_hash, counts_key, lines_key
from services.supervisor.settings import SupervisorSettings

AGENT_ID = "ag-" + "0" * 32
T0 = datetime(2026, 12, 5, 1, 0, 0, 123456, tzinfo=UTC)


def test_counts_survive_redis_round_trip() -> None:
    counts = _Counts(
        lines=10,
        stored=6,
        dropped=4,
        truncated=1,
        redacted=2,
        last_times={LogStream.STDOUT: T0},
    )

    fields = {str(name): str(value) for name, value in counts.as_hash().items()}
    restored = _counts_from_hash(AGENT_ID, fields)

    assert restored == counts
    assert restored.as_message() == LogCounts(
        lines=10, stored=6, dropped=4, truncated=1, redacted=2
    )


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"lines": "ten"}, id="not-a-number"),
        pytest.param({"last_time_stdout": "yesterday"}, id="bad-time"),
    ],
)
def test_invalid_counts_raise_store_error(fields: dict[str, str]) -> None:
    with pytest.raises(StoreError, match=f"log counts of agent '{AGENT_ID}' in Redis are invalid"):
        _counts_from_hash(AGENT_ID, fields)


def test_log_keys_named_by_agent() -> None:
    assert lines_key(AGENT_ID) == f"agent-runner:log-lines:{AGENT_ID}"
    assert counts_key(AGENT_ID) == f"agent-runner:log-counts:{AGENT_ID}"


def test_log_settings_defaults() -> None:
    settings = load_settings(SupervisorSettings, [])

    assert settings.log_rate_limit == 100.0
    assert settings.log_rate_burst == 1000
    assert settings.log_keep_lines == 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--log-rate-limit", "0"], "--log-rate-limit='0'", id="zero-rate"),
        pytest.param(["--log-rate-burst", "0"], "--log-rate-burst='0'", id="zero-burst"),
        pytest.param(["--log-keep-lines", "5"], "--log-keep-lines='5'", id="too-few-lines"),
        pytest.param(["--log-keep-lines", "many"], "--log-keep-lines='many'", id="not-a-number"),
    ],
)
def test_bad_log_setting_rejected(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(SupervisorSettings, argv)

    assert message in str(error.value)


def test_log_line_record_fields() -> None:
    line = LogLine(
        stream=LogStream.STDERR,
        time=T0,
        text="[REDACTED:bearer_token]",
        agent_id=AGENT_ID,
        container_id="c" * 64,
        redactions=1,
        dropped_before=3,
    )

    assert LogLine.model_validate_json(line.model_dump_json()) == line


def test_log_line_from_older_supervisor_accepted() -> None:
    line = LogLine.model_validate({"stream": "stdout", "time": None, "text": "hi"})

    assert line.agent_id is None
    assert line.redactions == 0
    assert line.dropped_before == 0


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"redactions": -1}, id="negative-redactions"),
        pytest.param({"dropped_before": -1}, id="negative-dropped"),
        pytest.param({"agent_id": "not-an-agent"}, id="bad-agent-id"),
        pytest.param({"source": "supervisor"}, id="unknown-field"),
    ],
)
def test_log_line_rejects_bad_fields(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LogLine.model_validate({"stream": "stdout", "time": None, "text": "hi", **fields})


def test_logs_reply_counts_optional() -> None:
    reply = LogsReply(correlation_id="c", agent_id=AGENT_ID, container_id="", lines=[])

    assert reply.counts is None


def test_log_counts_reject_unknown_field() -> None:
    with pytest.raises(ValidationError):
        LogCounts.model_validate(
            {"lines": 1, "stored": 1, "dropped": 0, "truncated": 0, "redacted": 0, "lost": 0}
        )
