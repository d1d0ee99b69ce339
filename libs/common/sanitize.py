"""Make untrusted text safe to store, print in a terminal or embed in JSON.

Agent output is hostile input: it may carry terminal escape sequences that rewrite what an
operator reads, carriage returns that hide a line, invalid UTF-8, or a single line large enough
to exhaust memory. It may also carry credentials that an agent printed by mistake. Every line
of agent output passes through `clean_line` (escaping, secret redaction, truncation) before the
supervisor stores, shows or publishes it; `sanitize_line` is the same without redaction.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from libs.common.apikeys import KEY_PREFIX

TRUNCATION_MARKER = " [truncated]"
# A UTF-8 character is at most 4 bytes, so this many bytes per kept character are enough to
# fill a line without decoding more of a 10 MB one.
MAX_BYTES_PER_CHARACTER = 4

# C0 controls except tab, DEL, and C1 controls; ESC (0x1b) is among them, so every escape
# sequence is shown as text instead of being interpreted by a terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# Unicode format characters that reorder or hide text: the bidirectional marks (including
# U+061C, the Arabic letter mark), embeddings, overrides and isolates.
_BIDI = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True, kw_only=True)
class CleanLine:
    """One line of output after `clean_line`: printable text and what was done to it."""

    text: str
    truncated: bool
    redactions: int


def max_line_bytes(max_length: int) -> int:
    """Return how many bytes of a raw line `clean_line` reads for `max_length` characters."""
    return max_length * MAX_BYTES_PER_CHARACTER


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\r":
        return "\\r"
    if char == "\n":
        return "\\n"
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def _printable(raw: bytes, *, max_length: int) -> tuple[str, bool]:
    truncated = len(raw) > max_line_bytes(max_length)
    if truncated:
        raw = raw[: max_line_bytes(max_length)]
    text = raw.decode("utf-8", errors="replace")
    text = _CONTROL.sub(_escape, text)
    text = _BIDI.sub(_escape, text)
    return text, truncated


def _cut(text: str, *, max_length: int, truncated: bool) -> tuple[str, bool]:
    if len(text) > max_length:
        text = text[:max_length]
        truncated = True
    if truncated:
        text += TRUNCATION_MARKER
    return text, truncated


def sanitize_line(raw: bytes, *, max_length: int) -> tuple[str, bool]:
    """Return `raw` as printable text of at most `max_length` characters plus a marker.

    Invalid UTF-8 becomes U+FFFD, control characters other than tab become visible escapes
    (`\\x1b`, `\\r`), and the boolean is true when the line was truncated.
    """
    text, truncated = _printable(raw, max_length=max_length)
    return _cut(text, max_length=max_length, truncated=truncated)


def clean_line(
    raw: bytes, *, max_length: int, redactor: SecretRedactor, truncated: bool = False
) -> CleanLine:
    """Escape, redact and truncate one raw line as `sanitize_line` does, redacting first.

    `truncated` is true when the caller already cut `raw`, so the marker is added even if the
    rest fits. Redaction runs before the cut, so a secret that ends inside the kept part is
    replaced whole.
    """
    text, cut_bytes = _printable(raw, max_length=max_length)
    text, redactions = redactor.redact(text)
    text, truncated = _cut(text, max_length=max_length, truncated=truncated or cut_bytes)
    return CleanLine(text=text, truncated=truncated, redactions=redactions)


def redaction_marker(kind: str) -> str:
    """Return the text that replaces a secret of `kind`, such as "[REDACTED:bearer_token]"."""
    return f"[REDACTED:{kind}]"


@dataclass(frozen=True)
class _SecretPattern:
    """A secret format: `pattern` must have a group named `secret`, the part replaced."""

    kind: str
    pattern: re.Pattern[str]


# Characters of URL-safe base64 and of base64. Lookarounds with them keep a pattern from
# matching inside a longer token.
_URLSAFE = r"A-Za-z0-9_-"
_BASE64 = r"A-Za-z0-9+/="
# Characters of an RFC 6750 bearer token.
_BEARER_ALPHABET = r"A-Za-z0-9._~+/=-"
# generate_key returns KEY_PREFIX and secrets.token_urlsafe(32), which is 43 characters.
_API_KEY_LENGTH = 43

_SECRET_PATTERNS = (
    _SecretPattern(
        "aws_access_key_id",
        re.compile(r"(?<![A-Z0-9])(?P<secret>(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16})(?![A-Z0-9])"),
    ),
    _SecretPattern(
        "aws_secret_access_key",
        re.compile(
            r"(?i:aws_?secret_?access_?key|aws_?secret_?key|secret_?access_?key)"
            rf"[\"']?\s*[:=]\s*[\"']?(?P<secret>[A-Za-z0-9/+]{{40}})(?![{_BASE64}])"
        ),
    ),
    _SecretPattern(
        "gcp_api_key",
        re.compile(rf"(?<![{_URLSAFE}])(?P<secret>AIza[{_URLSAFE}]{{35}})(?![{_URLSAFE}])"),
    ),
    _SecretPattern(
        "azure_storage_key",
        re.compile(rf"(?i:AccountKey)=(?P<secret>[{_BASE64}]{{20,}})"),
    ),
    _SecretPattern(
        "azure_sas_signature",
        re.compile(r"[?&](?i:sig)=(?P<secret>[A-Za-z0-9%+/=]{20,})"),
    ),
    _SecretPattern(
        "bearer_token",
        re.compile(
            # A word such as "Bearer authentication" is no token: a token has a digit or is
            # long.
            rf"(?i:\bbearer)\s+(?P<secret>(?=[{_BEARER_ALPHABET}]*[0-9])[{_BEARER_ALPHABET}]{{8,}}|[{_BEARER_ALPHABET}]{{20,}})"
        ),
    ),
    _SecretPattern(
        "basic_credentials",
        re.compile(
            r"(?i:authorization)[\"']?\s*[:=]\s*[\"']?(?i:basic)\s+(?P<secret>[A-Za-z0-9+/=]{8,})"
        ),
    ),
    _SecretPattern(
        "jwt",
        re.compile(
            rf"(?<![{_URLSAFE}])(?P<secret>eyJ[{_URLSAFE}]{{8,}}\.eyJ[{_URLSAFE}]{{8,}}\.[{_URLSAFE}]*)"
        ),
    ),
    _SecretPattern(
        "github_token",
        re.compile(
            r"(?<![A-Za-z0-9_])(?P<secret>(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}))"
        ),
    ),
    _SecretPattern(
        "slack_token",
        re.compile(r"(?<![A-Za-z0-9])(?P<secret>xox[abprs]-[A-Za-z0-9-]{10,})"),
    ),
    _SecretPattern(
        "agent_runner_api_key",
        re.compile(
            rf"(?<![{_URLSAFE}])(?P<secret>{re.escape(KEY_PREFIX)}[{_URLSAFE}]{{{_API_KEY_LENGTH}}})"
            rf"(?![{_URLSAFE}])"
        ),
    ),
)

PRIVATE_KEY = "private_key"
_KEY_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----")
_KEY_END = re.compile(r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----")
# Lines inside a PEM block: base64, an RFC 1421 header such as "Proc-Type: 4,ENCRYPTED", or
# blank, each with an optional carriage return at the end (escaped in shown text). Any other
# line ends the block, so a header without an END line cannot hide the rest of the output.
_KEY_BODY = re.compile(rf"(?:[{_BASE64}]*|[A-Za-z-]+:\s.*|\s*)(?:\\r)?")
_RAW_KEY_BEGIN = re.compile(rb"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----")
_RAW_KEY_END = re.compile(rb"-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----")
_RAW_KEY_BODY = re.compile(rb"(?:[A-Za-z0-9+/=]*|[A-Za-z-]+:\s.*|\s*)\r?")


def _replace(kind: str, counter: list[int]) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        counter[0] += 1
        start, end = match.span("secret")
        whole = match.group()
        offset = match.start()
        return whole[: start - offset] + redaction_marker(kind) + whole[end - offset :]

    return replace


class SecretRedactor:
    """Replace common credentials in successive lines of one output stream.

    Recognised formats:

    - AWS access key ids (AKIA, ASIA, ABIA, ACCA) and `aws_secret_access_key` assignments;
    - Google API keys, and Azure storage account keys and SAS signatures;
    - bearer tokens, HTTP basic credentials and JWTs;
    - GitHub and Slack tokens, and this project's API keys;
    - PEM private key blocks.

    A PEM block spans lines, so one redactor must see every line of its stream in order,
    including the lines that a rate limit dropped (`skip`).
    """

    def __init__(self) -> None:
        self._in_key_block = False

    @property
    def in_key_block(self) -> bool:
        """Whether the last line opened a PEM private key block that has not ended."""
        return self._in_key_block

    def redact(self, text: str) -> tuple[str, int]:
        """Return `text` with each secret replaced by its marker, and the replacement count."""
        redactions = 0
        if self._in_key_block:
            end = _KEY_END.search(text)
            if end is not None:
                self._in_key_block = False
                if end.start() > 0:
                    text = redaction_marker(PRIVATE_KEY) + text[end.start() :]
                    redactions += 1
            elif _KEY_BODY.fullmatch(text):
                return redaction_marker(PRIVATE_KEY), 1
            else:
                self._in_key_block = False

        text, inline = self._redact_key_blocks(text)
        redactions += inline
        counter = [0]
        for secret in _SECRET_PATTERNS:
            text = secret.pattern.sub(_replace(secret.kind, counter), text)
        return text, redactions + counter[0]

    def skip(self, raw: bytes) -> None:
        """Follow a PEM block through a line that is not shown, so its next lines stay hidden."""
        if self._in_key_block:
            if _RAW_KEY_END.search(raw) is not None or not _RAW_KEY_BODY.fullmatch(raw):
                self._in_key_block = False
            return
        begin = _RAW_KEY_BEGIN.search(raw)
        if begin is not None and _RAW_KEY_END.search(raw, begin.end()) is None:
            self._in_key_block = True

    def _redact_key_blocks(self, text: str) -> tuple[str, int]:
        # A whole block may sit on one line, as in a JSON service account file whose key has
        # "\n" escapes. The key text between BEGIN and END, or the end of line, is replaced.
        redactions = 0
        position = 0
        while (begin := _KEY_BEGIN.search(text, position)) is not None:
            end = _KEY_END.search(text, begin.end())
            body_end = len(text) if end is None else end.start()
            if body_end > begin.end():
                marker = redaction_marker(PRIVATE_KEY)
                text = text[: begin.end()] + marker + text[body_end:]
                redactions += 1
                body_end = begin.end() + len(marker)
            if end is None:
                self._in_key_block = True
                break
            position = body_end + len(end.group())
        return text, redactions
