"""Make untrusted text safe to store, print in a terminal or embed in JSON.

Agent output is hostile input: it may carry terminal escape sequences that rewrite what an
operator reads, carriage returns that hide a line, invalid UTF-8, or a single line large enough
to exhaust memory. Every line of agent output passes through `sanitize_line` before the
supervisor stores, shows or publishes it.
"""

from __future__ import annotations

import re

TRUNCATION_MARKER = " [truncated]"

# C0 controls except tab, DEL, and C1 controls; ESC (0x1b) is among them, so every escape
# sequence is shown as text instead of being interpreted by a terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# Unicode format characters that reorder or hide text: the bidirectional marks (including
# U+061C, the Arabic letter mark), embeddings, overrides and isolates.
_BIDI = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\r":
        return "\\r"
    if char == "\n":
        return "\\n"
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def sanitize_line(raw: bytes, *, max_length: int) -> tuple[str, bool]:
    """Return `raw` as printable text of at most `max_length` characters plus a marker.

    Invalid UTF-8 becomes U+FFFD, control characters other than tab become visible escapes
    (`\\x1b`, `\\r`), and the boolean is true when the line was truncated.
    """
    truncated = len(raw) > max_length * 4
    if truncated:
        # A UTF-8 character is at most 4 bytes, so this keeps enough bytes for max_length
        # characters without decoding a 10 MB line.
        raw = raw[: max_length * 4]
    text = raw.decode("utf-8", errors="replace")
    text = _CONTROL.sub(_escape, text)
    text = _BIDI.sub(_escape, text)
    if len(text) > max_length:
        text = text[:max_length]
        truncated = True
    if truncated:
        text += TRUNCATION_MARKER
    return text, truncated
