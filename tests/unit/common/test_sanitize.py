"""Tests for the sanitiser that every line of agent output passes through."""

from __future__ import annotations

import time
import unicodedata

import pytest

from libs.common.sanitize import TRUNCATION_MARKER, sanitize_line

MAX_LENGTH = 200


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"plain text", "plain text", id="plain"),
        pytest.param("naïve ✓ 日本語 🙂".encode(), "naïve ✓ 日本語 🙂", id="unicode"),
        pytest.param(b"a\tb", "a\tb", id="tab-kept"),
        pytest.param(b"\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m", id="ansi-colour"),
        pytest.param(b"\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H", id="clear-screen"),
        pytest.param(b"ok\x1b[1A\x1b[2Kfake", "ok\\x1b[1A\\x1b[2Kfake", id="cursor-up-erase"),
        pytest.param(b"\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07", id="osc-title-bel"),
        pytest.param(
            b"\x1b]8;;https://127.0.0.1/\x1b\\link\x1b]8;;\x1b\\",
            "\\x1b]8;;https://127.0.0.1/\\x1b\\link\\x1b]8;;\\x1b\\",
            id="osc-hyperlink",
        ),
        pytest.param(b"\x1bP+q\x1b\\", "\\x1bP+q\\x1b\\", id="dcs"),
        pytest.param(b"progress 10%\rdone", "progress 10%\\rdone", id="carriage-return"),
        pytest.param(
            b"ok\n2024-01-01 ERROR forged",
            "ok\\n2024-01-01 ERROR forged",
            id="forged-newline",
        ),
        pytest.param(b"a\x00b", "a\\x00b", id="nul"),
        pytest.param(b"a\x08b", "a\\x08b", id="backspace"),
        pytest.param(b"a\x0bb\x0cc", "a\\x0bb\\x0cc", id="vertical-tab-form-feed"),
        pytest.param(b"a\x7fb", "a\\x7fb", id="del"),
        pytest.param("a\u009b31mb".encode(), "a\\x9b31mb", id="c1-csi"),
        pytest.param("a\u0085b".encode(), "a\\x85b", id="c1-next-line"),
        pytest.param("a\u009db".encode(), "a\\x9db", id="c1-osc"),
        pytest.param("\u202eevil".encode(), "\\u202eevil", id="right-to-left-override"),
        pytest.param("\u202dx".encode(), "\\u202dx", id="left-to-right-override"),
        pytest.param("\u2066x\u2069".encode(), "\\u2066x\\u2069", id="isolate"),
        pytest.param("\u200fx".encode(), "\\u200fx", id="right-to-left-mark"),
        pytest.param("\u061cx".encode(), "\\u061cx", id="arabic-letter-mark"),
        pytest.param(b"a\xffb", "a\ufffdb", id="invalid-byte"),
        pytest.param(b"\x9b31m", "\ufffd31m", id="raw-c1-byte"),
        pytest.param(b"\xc3", "\ufffd", id="cut-sequence"),
        pytest.param(b"\xed\xa0\x80", "\ufffd\ufffd\ufffd", id="surrogate"),
        pytest.param(b"\xc0\xaf", "\ufffd\ufffd", id="overlong-slash"),
        pytest.param(b"", "", id="empty"),
    ],
)
def test_sanitize_line(raw: bytes, expected: str) -> None:
    text, truncated = sanitize_line(raw, max_length=MAX_LENGTH)

    assert text == expected
    assert truncated is False


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(bytes(range(256)), id="every-byte"),
        pytest.param("".join(chr(c) for c in range(0x80, 0xA0)).encode(), id="every-c1"),
        pytest.param(b"\x1b[31m\r\n\x00\x7f", id="mixed-controls"),
    ],
)
def test_output_has_no_controls(raw: bytes) -> None:
    text, _ = sanitize_line(raw, max_length=4096)

    controls = [char for char in text if unicodedata.category(char) == "Cc" and char != "\t"]
    assert controls == []


def test_line_at_limit_kept_whole() -> None:
    text, truncated = sanitize_line(b"x" * 10, max_length=10)

    assert text == "x" * 10
    assert truncated is False


def test_long_line_truncated_with_marker() -> None:
    text, truncated = sanitize_line(b"x" * 11, max_length=10)

    assert text == "x" * 10 + TRUNCATION_MARKER
    assert truncated is True


def test_escapes_count_towards_limit() -> None:
    text, truncated = sanitize_line(b"\x1b" * 10, max_length=10)

    assert text == "\\x1b\\x1b\\x" + TRUNCATION_MARKER
    assert truncated is True


def test_multibyte_line_at_limit_kept_whole() -> None:
    raw = "€".encode() * 10

    text, truncated = sanitize_line(raw, max_length=10)

    assert text == "€" * 10
    assert truncated is False


def test_huge_line_truncated_fast() -> None:
    raw = b"A" * 10_000_000

    started = time.perf_counter()
    text, truncated = sanitize_line(raw, max_length=8192)
    elapsed = time.perf_counter() - started

    assert truncated is True
    assert text == "A" * 8192 + TRUNCATION_MARKER
    assert elapsed < 0.5


def test_huge_line_of_escapes_truncated_fast() -> None:
    raw = b"\x1b" * 10_000_000

    started = time.perf_counter()
    text, truncated = sanitize_line(raw, max_length=8192)
    elapsed = time.perf_counter() - started

    assert truncated is True
    assert len(text) == 8192 + len(TRUNCATION_MARKER)
    assert elapsed < 0.5


def test_output_has_no_bidi_controls() -> None:
    bidi_controls = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
    raw = "".join(chr(code) for code in bidi_controls).encode()

    text, _ = sanitize_line(raw, max_length=4096)

    # Every bidirectional control is a format character (category Cf).
    assert [char for char in text if unicodedata.category(char) == "Cf"] == []
