"""Tests for joining Docker log frames into bounded lines, and for the log rate limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.supervisor.docker_adapter import LogFrame
from services.supervisor.log_lines import LineAssembler, RawLine, TokenBucket

T0 = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)
# The payload size of a partial frame that Docker 20.10 sends for a long line.
PARTIAL = 16 * 1024


def frame(payload: bytes, *, second: int = 0) -> LogFrame:
    return LogFrame(time=T0 + timedelta(seconds=second), payload=payload)


def at(second: int) -> datetime:
    return T0 + timedelta(seconds=second)


@pytest.mark.parametrize(
    ("payloads", "expected"),
    [
        pytest.param([b"one\n"], [b"one"], id="one-line"),
        pytest.param([b"one\n", b"two\n"], [b"one", b"two"], id="two-frames"),
        pytest.param([b"a\nb\n"], [b"a", b"b"], id="two-lines-one-frame"),
        pytest.param([b"\n"], [b""], id="empty-line"),
        pytest.param([b"par", b"tial\n"], [b"partial"], id="partial-frames"),
        pytest.param([b"a\tb\r\n"], [b"a\tb\r"], id="carriage-return-kept"),
        pytest.param([b"real\nforged\n"], [b"real", b"forged"], id="newline-splits"),
        pytest.param([b""], [], id="empty-frame"),
    ],
)
def test_frames_joined_into_lines(payloads: list[bytes], expected: list[bytes]) -> None:
    assembler = LineAssembler(limit=100)

    lines = [line for payload in payloads for line in assembler.feed(frame(payload))]

    assert [line.data for line in lines] == expected
    assert all(line.truncated is False for line in lines)
    assert assembler.flush() is None


def test_line_takes_time_of_first_frame() -> None:
    assembler = LineAssembler(limit=100)

    assembler.feed(frame(b"start ", second=1))
    lines = assembler.feed(frame(b"end\nnext ", second=2))
    rest = assembler.feed(frame(b"line\n", second=3))

    assert lines == [RawLine(time=at(1), data=b"start end", truncated=False)]
    assert rest == [RawLine(time=at(2), data=b"next line", truncated=False)]


def test_long_line_cut_at_limit() -> None:
    assembler = LineAssembler(limit=10)

    lines = assembler.feed(frame(b"0123456789abcdef\nshort\n"))

    assert lines == [
        RawLine(time=at(0), data=b"0123456789", truncated=True),
        RawLine(time=at(0), data=b"short", truncated=False),
    ]


def test_line_at_limit_not_truncated() -> None:
    assembler = LineAssembler(limit=10)

    assert assembler.feed(frame(b"0123456789\n")) == [
        RawLine(time=at(0), data=b"0123456789", truncated=False)
    ]


def test_ten_megabyte_line_held_bounded() -> None:
    limit = 32 * 1024
    assembler = LineAssembler(limit=limit)
    total = 10_000_000
    sent = 0
    lines: list[RawLine] = []

    while sent < total:
        size = min(PARTIAL, total - sent)
        sent += size
        payload = b"A" * size + (b"\n" if sent == total else b"")
        lines += assembler.feed(frame(payload))
        # Nothing past the limit is kept while the line is still arriving.
        assert sum(len(part) for part in assembler._parts) <= limit
    lines += assembler.feed(frame(b"after\n"))

    assert len(lines) == 2
    assert lines[0].data == b"A" * limit
    assert lines[0].truncated is True
    assert lines[1] == RawLine(time=at(0), data=b"after", truncated=False)


def test_unfinished_line_flushed() -> None:
    assembler = LineAssembler(limit=100)

    assert assembler.feed(frame(b"no newline", second=4)) == []

    assert assembler.flush() == RawLine(time=at(4), data=b"no newline", truncated=False)
    assert assembler.flush() is None


def test_frame_without_timestamp_has_no_time() -> None:
    assembler = LineAssembler(limit=100)

    lines = assembler.feed(LogFrame(time=None, payload=b"x\n"))

    assert lines == [RawLine(time=None, data=b"x", truncated=False)]


def test_assembler_rejects_zero_limit() -> None:
    with pytest.raises(ValueError, match="at least 1 byte, got 0"):
        LineAssembler(limit=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_drops() -> None:
    bucket = TokenBucket(rate=1.0, burst=5, clock=FakeClock())

    taken = [bucket.take() for _ in range(8)]

    assert taken == [True] * 5 + [False] * 3


def test_bucket_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=5, clock=clock)
    for _ in range(5):
        bucket.take()

    clock.now += 1.5

    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_bucket_saves_at_most_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=3, clock=clock)

    clock.now += 3600

    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_flood_drop_count_exact() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=8.0, burst=20, clock=clock)
    dropped = 0

    # 20 lines at once take the burst, then 2048 lines over 2 s get 8 tokens per second. The
    # time steps are powers of two, so the float arithmetic is exact.
    for step in range(20 + 2048):
        if step >= 20:
            clock.now += 1 / 1024
        if not bucket.take():
            dropped += 1

    assert dropped == 20 + 2048 - 20 - 16


def test_bucket_ignores_clock_going_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    bucket.take()

    clock.now -= 100

    assert bucket.take() is False


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_bucket_rejects_bad_limits(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate must be above 0 and burst at least 1"):
        TokenBucket(rate=rate, burst=burst)
