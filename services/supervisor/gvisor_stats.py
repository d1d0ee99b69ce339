"""Count an agent's processes inside its gVisor sandbox.

Under runsc the pids cgroup contains the sandbox's host threads, which grow by about ten per
process the agent starts and stay after it exits, so it tells little about the agent. gVisor's
kernel counts the agent's own tasks, and `runsc events --stats` prints that count as
`pids.current`. Each run of runsc costs about 10 ms of CPU (bench/monitor.py), so the monitor
requests a count only when it may have changed (monitor.py).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from services.supervisor.errors import SupervisorError

# Each sandbox replies from within its agent's CPU quota, so a busy one can take seconds.
TIMEOUT = 30.0


class GvisorStatsUnavailable(SupervisorError):
    """Failure of `runsc events --stats` for a container; the message gives the cause."""


class GvisorTasks:
    """Background runs of `runsc --root ROOT events --stats ID`, one per container at a time.

    gVisor's kernel replies from inside the sandbox, which runs under the agent's CPU quota,
    so a busy agent may take seconds to reply. `start` therefore only launches runsc, and
    `result` collects the count in a later monitoring round, so one slow sandbox does not
    delay the monitoring of the others. Not thread-safe: the monitor calls it from one thread
    at a time.
    """

    def __init__(self, *, runsc: Path, root: Path, timeout: float = TIMEOUT) -> None:
        self.runsc = runsc
        self.root = root
        self.timeout = timeout
        self._running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}

    def start(self, container_id: str) -> bool:
        """Launch runsc for the container; return False when a run is already in progress.

        Raises GvisorStatsUnavailable when runsc cannot be started.
        """
        if container_id in self._running:
            return False
        command = [str(self.runsc), f"--root={self.root}", "events", "--stats", container_id]
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise GvisorStatsUnavailable(
                f"cannot run {self.runsc} events for container {container_id[:12]}: {exc}; "
                "check --runsc-binary"
            ) from exc
        self._running[container_id] = (process, time.monotonic())
        return True

    def result(self, container_id: str) -> int | None:
        """Return the count of a finished run, or None when none has finished.

        Raises GvisorStatsUnavailable when the run failed or took longer than the timeout,
        which ends it.
        """
        entry = self._running.get(container_id)
        if entry is None:
            return None
        process, started = entry
        if process.poll() is None:
            if time.monotonic() - started < self.timeout:
                return None
            self.cancel(container_id)
            raise GvisorStatsUnavailable(
                f"{self.runsc} events gave no count for container {container_id[:12]} within "
                f"{self.timeout:g} s"
            )
        del self._running[container_id]
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            detail = stderr.decode(errors="replace").strip()[-300:]
            raise GvisorStatsUnavailable(
                f"{self.runsc} events failed for container {container_id[:12]} with status "
                f"{process.returncode}: {detail or 'no message'}; check --runsc-state-root "
                f"({self.root})"
            )
        return parse_task_count(stdout, container_id)

    def cancel(self, container_id: str) -> None:
        """End and reap the container's run, if one is in progress."""
        entry = self._running.pop(container_id, None)
        if entry is None:
            return
        process = entry[0]
        process.kill()
        process.communicate()


def parse_task_count(output: bytes, container_id: str) -> int:
    """Return `data.pids.current` from the JSON that `runsc events --stats` prints."""
    try:
        event = json.loads(output)
        count = event["data"]["pids"]["current"]
    except (ValueError, TypeError, KeyError) as exc:
        raise GvisorStatsUnavailable(
            f"runsc events printed no task count for container {container_id[:12]}: "
            f"{output[:200]!r}"
        ) from exc
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise GvisorStatsUnavailable(
            f"runsc events printed task count {count!r} for container {container_id[:12]}"
        )
    return count
