"""Audit events for occurrences that repeat on every request, counted instead of sent each time.

A successful authentication or a rate-limited request happens on every request of a busy
client, and one audit event each would flood the stream. `RepeatedEvents` sends one event at
the first occurrence of a group (such as a key id and a client address) in a window, counts
the rest, and sends their number in a second event when the window ends. Every event carries
`details.requests`, the occurrences it stands for, so the sum over a group's events is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from libs.common import logs
from libs.common.audit import AuditPublisher
from libs.common.messages import AuditOutcome

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_SECONDS = 60.0
# Groups counted at once; beyond it, occurrences of new groups are counted in one group whose
# fields are all "other", so memory stays bounded whatever the number of clients.
MAX_GROUPS = 100_000
OVERFLOW = "other"


@dataclass
class _Window:
    started: float
    actor: str
    suppressed: int = 0


class RepeatedEvents:
    """Send `event_type` once per group per window, with the count of what it stands for."""

    def __init__(
        self,
        audit: AuditPublisher,
        event_type: str,
        *,
        outcome: AuditOutcome,
        reason_code: str,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        self._audit = audit
        self._event_type = event_type
        self._outcome = outcome
        self._reason_code = reason_code
        self._window_seconds = window_seconds
        self._clock = clock
        self._max_groups = max_groups
        self._windows: dict[tuple[tuple[str, str], ...], _Window] = {}
        self._task: asyncio.Task[None] | None = None

    def record(self, *, actor: str, **group: str) -> bool:
        """Count one occurrence of `group`; return whether it opened a window and was sent."""
        key = tuple(sorted(group.items()))
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window.started >= self._window_seconds:
            self._close(key, window)
            window = None
        if window is None and len(self._windows) >= self._max_groups:
            key = tuple((name, OVERFLOW) for name, _ in key)
            actor = OVERFLOW
            window = self._windows.get(key)
        if window is None:
            self._windows[key] = _Window(started=now, actor=actor)
            self._emit(key, actor=actor, requests=1)
            return True
        window.suppressed += 1
        return False

    def flush(self, *, all_windows: bool = False) -> None:
        """Close the windows that ended (every window with `all_windows`) and send their counts."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            if all_windows or now - window.started >= self._window_seconds:
                self._close(key, window)

    def start(self) -> None:
        """Flush ended windows in the background, a few times per window."""
        self._task = asyncio.create_task(self._run(), name=f"repeated-{self._event_type}")

    async def close(self) -> None:
        """Stop the background task and send the counts of every open window."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush(all_windows=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._window_seconds / 6)
            self.flush()

    def _close(self, key: tuple[tuple[str, str], ...], window: _Window) -> None:
        del self._windows[key]
        if window.suppressed:
            # The count stands for many requests, so it carries no request's correlation id.
            with logs.correlation_scope(None):
                self._emit(key, actor=window.actor, requests=window.suppressed)

    def _emit(self, key: tuple[tuple[str, str], ...], *, actor: str, requests: int) -> None:
        self._audit.emit(
            self._event_type,
            outcome=self._outcome,
            actor=actor,
            reason_code=self._reason_code,
            details={**dict(key), "requests": requests, "window_seconds": self._window_seconds},
        )
