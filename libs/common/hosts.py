"""Host normalisation and IP literal parsing for the egress proxy.

An agent controls the host it requests (CONNECT authority, Host header, absolute URL), so the
policy never compares the raw text. `normalize_host` reduces it to one lowercase ASCII name,
and the proxy must connect to that name, not to the raw text, or the check and the connection
could disagree. `parse_ip_literal` recognises the `inet_aton` spellings of an IPv4 address, so
`0x7f.1` cannot pass as a host name while the C library connects to 127.0.0.1.
"""

from __future__ import annotations

import re
import unicodedata
from ipaddress import AddressValueError, IPv4Address, IPv6Address

try:
    import idna
except ImportError:  # pragma: no cover - idna comes with httpx
    idna = None  # type: ignore[assignment]

MAX_LABEL_LENGTH = 63
MAX_NAME_LENGTH = 253
MAX_PORT = 65535

# Letters, digits and hyphens, neither first nor last (RFC 952 as relaxed by RFC 1123).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# URL delimiters that end the authority. A parser that stops at them and one that splits
# userinfo at the last `@` read `evil.test#@allowed.test` as different hosts, so they are
# rejected rather than interpreted.
_DELIMITERS = frozenset("/?#\\")
# Unicode categories rejected anywhere: control, format (zero-width joiners, bidi marks, soft
# hyphen), surrogate, private use, unassigned, and separators (spaces, line and paragraph).
_REJECTED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
_DIGITS_BY_BASE = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}
# Largest value of the last part of an inet_aton literal, by the number of parts before it.
_LAST_PART_MAX = (0xFFFFFFFF, 0xFFFFFF, 0xFFFF, 0xFF)


class HostInvalid(ValueError):
    """A host that is not a valid host name or IP literal; `host` is the raw text."""

    def __init__(self, host: str, problem: str) -> None:
        super().__init__(f"invalid host {host!r}: {problem}")
        self.host = host
        self.problem = problem


def _encode_idna(name: str) -> bytes:
    """Encode a non-ASCII name: UTS #46 and IDNA2008 if `idna` is installed, else IDNA2003.

    The two differ on a few characters (IDNA2003 maps `ß` to `ss`, IDNA2008 keeps it as
    `xn--zca`), so hosts and patterns are always encoded by the same encoder in one process.
    Raises `UnicodeError` for a name that does not encode.
    """
    if idna is None:  # pragma: no cover - idna comes with httpx
        return name.encode("idna")
    return idna.encode(name, uts46=True, transitional=False)


def normalize_host(raw: str) -> str:
    """Reduce a requested host to the lowercase ASCII form that policies match.

    Strips userinfo (`user:pw@`), a port, the brackets of an IPv6 literal and exactly one
    trailing dot, then IDNA-encodes a non-ASCII name. An IPv6 literal comes back in its
    compressed form, while an IPv4 literal keeps its spelling for `parse_ip_literal`.
    Raises `HostInvalid` for empty labels, a label over 63 or a name over 253 characters,
    anything but letters, digits and hyphens after encoding, whitespace, control characters,
    URL delimiters (`/?#\\`), more than one `@` and IPv6 zone ids.
    """
    for char in raw:
        if char in _DELIMITERS or unicodedata.category(char) in _REJECTED_CATEGORIES:
            raise HostInvalid(raw, f"character {char!r} is not allowed in a host")

    userinfo_count = raw.count("@")
    if userinfo_count > 1:
        raise HostInvalid(raw, "more than one '@'")
    host = raw.rpartition("@")[2].lower()

    if host.startswith("["):
        return _normalize_bracketed(raw, host)
    if host.count(":") > 1:
        # An unbracketed IPv6 literal cannot carry a port.
        return _normalize_ipv6(raw, host)
    host = _strip_port(raw, host)

    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise HostInvalid(raw, "empty host name")
    if any(label == "" for label in host.split(".")):
        raise HostInvalid(raw, "empty label")

    if not host.isascii():
        try:
            host = _encode_idna(host).decode("ascii")
        except UnicodeError as exc:
            raise HostInvalid(raw, f"IDNA encoding failed: {exc}") from exc

    _check_ascii_name(raw, host)
    return host


def _normalize_bracketed(raw: str, host: str) -> str:
    inside, bracket, rest = host[1:].partition("]")
    if not bracket:
        raise HostInvalid(raw, "missing ']' after an IPv6 literal")
    if rest:
        if not rest.startswith(":"):
            raise HostInvalid(raw, f"unexpected {rest!r} after an IPv6 literal")
        _check_port(raw, rest[1:])
    return _normalize_ipv6(raw, inside)


def _normalize_ipv6(raw: str, text: str) -> str:
    if "%" in text:
        raise HostInvalid(raw, "IPv6 zone ids are not allowed")
    try:
        return IPv6Address(text).compressed
    except AddressValueError as exc:
        raise HostInvalid(raw, f"invalid IPv6 literal: {exc}") from exc


def _strip_port(raw: str, host: str) -> str:
    name, colon, port = host.partition(":")
    if colon:
        _check_port(raw, port)
    return name


def _check_port(raw: str, port: str) -> None:
    if not (port.isascii() and port.isdigit()) or int(port) > MAX_PORT:
        raise HostInvalid(raw, f"invalid port {port!r}, expected 0 to {MAX_PORT}")


def _check_ascii_name(raw: str, host: str) -> None:
    if len(host) > MAX_NAME_LENGTH:
        raise HostInvalid(raw, f"name is {len(host)} characters, the maximum is {MAX_NAME_LENGTH}")
    for label in host.split("."):
        if len(label) > MAX_LABEL_LENGTH:
            raise HostInvalid(
                raw, f"label {label!r} is over the maximum of {MAX_LABEL_LENGTH} characters"
            )
        if not _LABEL.fullmatch(label):
            raise HostInvalid(
                raw, f"label {label!r} is not letters, digits and inner hyphens after IDNA"
            )


def parse_ipv4_literal(text: str) -> IPv4Address | None:
    """Parse an IPv4 literal the way glibc `inet_aton` does, or return None.

    One to four parts separated by dots, each decimal, hexadecimal after `0x` or octal after a
    leading `0`. Every part but the last is one byte, and the last fills the remaining bytes:
    `127.1`, `0x7f.1`, `0177.0.0.1`, `2130706433` and `0x7f000001` are all 127.0.0.1.
    Unlike glibc, which ignores anything after a whitespace character, any trailing text
    returns None.
    """
    parts = text.split(".")
    if len(parts) > len(_LAST_PART_MAX):
        return None

    values = []
    for part in parts:
        value = _parse_inet_aton_part(part)
        if value is None:
            return None
        values.append(value)

    *leading, last = values
    if any(value > 0xFF for value in leading) or last > _LAST_PART_MAX[len(leading)]:
        return None
    result = last
    for index, value in enumerate(leading):
        result |= value << (8 * (3 - index))
    return IPv4Address(result)


def _parse_inet_aton_part(part: str) -> int | None:
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
    elif part.startswith("0") and len(part) > 1:
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits or any(char not in _DIGITS_BY_BASE[base] for char in digits):
        return None
    return int(digits, base)


def parse_ip_literal(host: str) -> IPv4Address | IPv6Address | None:
    """Parse `host` as an IPv4 literal in any `inet_aton` spelling or as an IPv6 literal.

    Brackets around an IPv6 literal are accepted. Returns None for anything else, including
    an IPv6 literal with a zone id (`fe80::1%eth0`), which `normalize_host` rejects.
    """
    ipv4 = parse_ipv4_literal(host)
    if ipv4 is not None:
        return ipv4

    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" in text or ":" not in text:
        return None
    try:
        return IPv6Address(text)
    except AddressValueError:
        return None
