"""Tests for reading an agent's task count from `runsc events --stats`."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from services.supervisor.gvisor_stats import GvisorStatsUnavailable, GvisorTasks, parse_task_count

CONTAINER = "ec0b56d437fb" + "0" * 52
# What runsc 0.0~20221219 printed for a container running a fork bomb at RLIMIT_NPROC 64.
OUTPUT = {
    "type": "stats",
    "id": CONTAINER,
    "data": {
        "cpu": {"usage": {"total": 673112881}},
        "memory": {"usage": {"limit": 0, "usage": 2027520, "failcnt": 0}},
        "pids": {"current": 64},
    },
}


def test_task_count_parsed() -> None:
    assert parse_task_count(json.dumps(OUTPUT).encode(), CONTAINER) == 64


@pytest.mark.parametrize(
    "output",
    [
        b"",
        b"loading sandbox: file does not exist",
        json.dumps({"type": "stats", "data": {}}).encode(),
        json.dumps({"data": {"pids": {"current": -1}}}).encode(),
        json.dumps({"data": {"pids": {"current": "64"}}}).encode(),
        json.dumps({"data": {"pids": {"current": True}}}).encode(),
        json.dumps([1, 2]).encode(),
    ],
)
def test_bad_output_rejected(output: bytes) -> None:
    with pytest.raises(GvisorStatsUnavailable, match=CONTAINER[:12]):
        parse_task_count(output, CONTAINER)


def fake_runsc(tmp_path: Path, script: str) -> Path:
    path = tmp_path / "runsc"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def wait_for(tasks: GvisorTasks, container_id: str) -> int:
    """Collect the run's count, waiting up to 10 s."""
    for _ in range(1000):
        count = tasks.result(container_id)
        if count is not None:
            return count
        time.sleep(0.01)
    raise AssertionError("runsc did not finish")


def test_runs_runsc_with_root_and_id(tmp_path: Path) -> None:
    arguments = tmp_path / "arguments"
    runsc = fake_runsc(tmp_path, f"echo \"$@\" > {arguments}\necho '{json.dumps(OUTPUT)}'\n")
    tasks = GvisorTasks(runsc=runsc, root=tmp_path / "state")

    assert tasks.start(CONTAINER) is True
    assert tasks.start(CONTAINER) is False  # one run per container at a time
    assert wait_for(tasks, CONTAINER) == 64
    assert arguments.read_text().split() == [
        f"--root={tmp_path / 'state'}",
        "events",
        "--stats",
        CONTAINER,
    ]
    assert tasks.result(CONTAINER) is None  # collected once


def test_failure_names_root(tmp_path: Path) -> None:
    runsc = fake_runsc(tmp_path, "echo 'loading sandbox: file does not exist' >&2\nexit 128\n")
    tasks = GvisorTasks(runsc=runsc, root=tmp_path / "state")
    tasks.start(CONTAINER)

    with pytest.raises(GvisorStatsUnavailable) as error:
        wait_for(tasks, CONTAINER)

    message = str(error.value)
    assert "status 128: loading sandbox: file does not exist" in message
    assert f"--runsc-state-root ({tmp_path / 'state'})" in message
    assert tasks.start(CONTAINER) is True  # a failed run does not block the next


def test_missing_binary_named(tmp_path: Path) -> None:
    tasks = GvisorTasks(runsc=tmp_path / "absent", root=tmp_path)

    with pytest.raises(GvisorStatsUnavailable, match="check --runsc-binary"):
        tasks.start(CONTAINER)


def test_slow_runsc_ended_after_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    runsc = fake_runsc(tmp_path, f"echo $$ > {pid_file}\nexec sleep 30\n")
    tasks = GvisorTasks(runsc=runsc, root=tmp_path, timeout=0.3)
    tasks.start(CONTAINER)

    assert tasks.result(CONTAINER) is None  # still running, within the timeout
    time.sleep(0.4)
    with pytest.raises(GvisorStatsUnavailable, match=r"gave no count .* within 0.3 s"):
        tasks.result(CONTAINER)

    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    assert tasks.start(CONTAINER) is True
    tasks.cancel(CONTAINER)
