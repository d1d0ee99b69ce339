"""Tests for the JSON logging set-up every service runs at start."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_service_code(body: str) -> subprocess.CompletedProcess[str]:
    code = (
        "from libs.common.logs import configure_logging\n"
        "configure_logging(service='netguard', host='h1')\n" + body
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
        check=False,
    )


def test_lines_are_json_with_service_and_host() -> None:
    result = run_service_code("import logging\nlogging.getLogger('t').warning('hello %s', 'x')")

    line = json.loads(result.stderr.strip())
    assert line["message"] == "hello x"
    assert (line["service"], line["host"], line["level"]) == ("netguard", "h1", "WARNING")


def test_abort_leaves_stack_in_log() -> None:
    # libnftables ends the process with abort() on some assertions; without a handler the
    # service would vanish without a line.
    result = run_service_code("import os\nos.abort()")

    assert result.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in result.stderr
    assert 'File "<string>", line 4' in result.stderr
