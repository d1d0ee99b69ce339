"""Pure parts of log collection: joining Docker's log frames into lines, and the rate limit.

Both run in the threads that follow container output (agent_logs.py), so neither touches
asyncio, Docker or Redis, and both are tested without them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from services.supervisor.docker_adapter import LogFrame


@dataclass(frozen=True, kw_only=True)
class RawLine:
    """One line of container output without its newline, at most the assembler's limit."""

    time: datetime | None
    data: bytes
    # True when bytes past the limit were discarded.
    truncated: bool


class LineAssembler:
    """Join the frames of one stream into lines, keeping at most `limit` bytes of each.

    Bytes past the limit are discarded as they arrive, so a 10 MB line costs `limit` bytes of
    memory, not 10 MB. A line takes the time of its first frame.
    """

    def __init__(self, *, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"line limit must be at least 1 byte, got {limit}")
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._truncated = False
        self._time: datetime | None = None
        self._open = False

    def feed(self, frame: LogFrame) -> list[RawLine]:
        """Add one frame and return the lines that it completed, oldest first."""
        lines: list[RawLine] = []
        pieces = frame.payload.split(b"\n")
        for index, piece in enumerate(pieces):
            if not self._open:
                if index == len(pieces) - 1 and not piece:
                    break  # the frame ended with a newline; nothing of a next line yet
                self._open = True
                self._time = frame.time
            self._append(piece)
            if index < len(pieces) - 1:
                lines.append(self._take())
        return lines

    def flush(self) -> RawLine | None:
        """Return the unfinished last line of a stream that ended, if there is one."""
        return self._take() if self._open else None

    def _append(self, piece: bytes) -> None:
        room = self._limit - self._size
        if len(piece) > room:
            piece = piece[:room]
            self._truncated = True
        if piece:
            self._parts.append(piece)
            self._size += len(piece)

    def _take(self) -> RawLine:
        line = RawLine(time=self._time, data=b"".join(self._parts), truncated=self._truncated)
        self._parts = []
        self._size = 0
        self._truncated = False
        self._time = None
        self._open = False
        return line


class TokenBucket:
    """A thread-safe token bucket: `rate` tokens per second, at most `burst` saved up.

    It starts full, so an agent may write `burst` lines at once before the rate applies.
    """

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be above 0 and burst at least 1, got {rate}, {burst}")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take one token and return True, or return False when the bucket is empty."""
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._updated)
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._updated = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True
