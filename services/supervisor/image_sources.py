"""Image URLs and trusted image sources: canonical form, prefix matching and address checks.

The downloader (download.py) passes every URL it would fetch, the first one and each redirect
target, through `parse_image_url`, `trusted_source_for` and, once the host is resolved,
`check_addresses`. This module does no network I/O.

A URL and a source are compared in one canonical form, so that another spelling can neither
move a URL out of a source nor into one. That form has a lower-case scheme and host
(`normalize_host`, IDNA), IP literals in standard form whatever `inet_aton` spelling they came
in, and the scheme's default port filled in. Its path has unreserved characters percent-decoded
and other escapes in upper case. Paths with `.` or `..` segments (also spelled `%2E` or followed by
`;parameters`, which Tomcat strips), a backslash, or an escaped `/`, `\\`, `%` or control
character are rejected instead of normalised, because servers disagree on how to read them.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from urllib.parse import urlsplit, urlunsplit

from libs.common.addresses import classify
from libs.common.hosts import MAX_PORT, HostInvalid, normalize_host, parse_ip_literal
from services.supervisor.errors import FailureReason, ImageRejected

IPAddress = IPv4Address | IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}
SOURCES_OPTION = "--trusted-image-sources"
SOURCE_EXAMPLE = "https://images.example.com/agents/"

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Characters that RFC 3986 allows unescaped in a path: pchar and the segment separator.
_PATH_CHARACTERS = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_HEX_DIGITS = frozenset(string.hexdigits)
# Escapes that some servers decode before splitting the path into segments or decode a second
# time, so `/agents/..%2Fsecret` could leave the prefix on the server while it looks inside.
_REJECTED_ESCAPES = {0x2F: "'/'", 0x5C: "'\\'", 0x25: "'%'"}


class UrlInvalid(ValueError):
    """A URL or source that is not an acceptable absolute http(s) URL.

    `problem` completes a sentence whose subject is the URL ("has no host"), and `fix` is the
    change that would make it acceptable.
    """

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True, kw_only=True)
class ImageUrl:
    """An image URL in canonical form. `address` is set when the host is an IP literal."""

    scheme: str
    host: str
    port: int
    path: str
    query: str
    address: IPAddress | None

    @property
    def authority(self) -> str:
        """Host and, unless it is the scheme's default, port, as the `Host` header carries them."""
        host = f"[{self.host}]" if isinstance(self.address, IPv6Address) else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        """Scheme, host and port, such as `https://images.example.com`."""
        return f"{self.scheme}://{self.authority}"

    @property
    def target(self) -> str:
        """Path and query as sent in the request line."""
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def text(self) -> str:
        """The whole canonical URL, the base for resolving a relative redirect."""
        return self.origin + self.target

    @property
    def display(self) -> str:
        """The URL for messages: the query is elided because signed URLs carry a token there."""
        return self.origin + self.path + ("?…" if self.query else "")


@dataclass(frozen=True, kw_only=True)
class TrustedSource:
    """A URL prefix from which images may be downloaded, in the canonical form of ImageUrl."""

    scheme: str
    host: str
    port: int
    path: str
    address: IPAddress | None

    @property
    def url(self) -> str:
        """The source in canonical form, such as `https://images.example.com/agents/`."""
        return self._as_url().origin + self.path

    def contains(self, url: ImageUrl) -> bool:
        """Return whether `url` has this source's origin and a path under its path.

        The path must continue at a segment boundary: `/agents/` and `/agents` both contain
        `/agents/a.tar`, and neither contains `/agents-evil/a.tar`.
        """
        if (url.scheme, url.host, url.port) != (self.scheme, self.host, self.port):
            return False
        if self.path.endswith("/"):
            return url.path.startswith(self.path)
        return url.path == self.path or url.path.startswith(self.path + "/")

    def _as_url(self) -> ImageUrl:
        return ImageUrl(
            scheme=self.scheme,
            host=self.host,
            port=self.port,
            path=self.path,
            query="",
            address=self.address,
        )


def parse_url(text: str, *, allow_http: bool) -> ImageUrl:
    """Return `text` in canonical form; raise UrlInvalid when it is not acceptable.

    Credentials are rejected before the host is read, so no message built from the problem
    contains a password.
    """
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in text):
        # urlsplit silently drops tabs and newlines, which would hide them from the checks.
        raise UrlInvalid("contains a space or control character", "percent-encode it")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # unbalanced brackets around an IPv6 literal
        raise UrlInvalid(f"cannot be parsed ({exc})", "give an absolute URL") from exc
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        hint = "" if allow_http else " (plain http:// is accepted only in the development profile)"
        raise UrlInvalid(
            f"has scheme {parts.scheme!r}, which is not allowed", f"use https://{hint}"
        )
    if "@" in parts.netloc:
        raise UrlInvalid("contains credentials", "remove the user name and password")
    if not parts.netloc:
        raise UrlInvalid("has no host", "give an absolute URL such as https://host/path")

    host_text, port_text = _split_authority(parts.netloc)
    try:
        host = normalize_host(host_text)
    except HostInvalid as exc:
        raise UrlInvalid(f"has the invalid host {host_text!r}", exc.problem) from exc
    address = parse_ip_literal(host)
    if address is not None:
        host = address.compressed

    return ImageUrl(
        scheme=parts.scheme,
        host=host,
        port=_port(port_text, parts.scheme),
        path=canonical_path(parts.path or "/"),
        query=_encode_non_ascii(parts.query),
        address=address,
    )


def _split_authority(netloc: str) -> tuple[str, str | None]:
    """Split host and port text; the host keeps the brackets of an IPv6 literal."""
    if netloc.startswith("["):
        inside, bracket, rest = netloc[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UrlInvalid(
                f"has the invalid host {netloc!r}", "write an IPv6 literal as [2001:db8::1]:port"
            )
        return f"[{inside}]", rest[1:] if rest else None
    if netloc.count(":") > 1:
        raise UrlInvalid(f"has the invalid host {netloc!r}", "put an IPv6 literal in brackets")
    host, colon, port = netloc.partition(":")
    return host, port if colon else None


def _port(text: str | None, scheme: str) -> int:
    if text is None:
        return DEFAULT_PORTS[scheme]
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_PORT:
        raise UrlInvalid(f"has the invalid port {text!r}", f"give a port from 1 to {MAX_PORT}")
    return int(text)


def canonical_path(path: str) -> str:
    """Return `path` with unreserved characters decoded and every other escape in upper case.

    Characters that a path may not contain unescaped, non-ASCII ones included, are
    percent-encoded as UTF-8. Raises UrlInvalid for an invalid escape, a backslash, an escaped
    `/`, `\\`, `%` or control character, and `.` or `..` segments.
    """
    pieces = []
    index = 0
    while index < len(path):
        char = path[index]
        if char == "%":
            pieces.append(_canonical_escape(path[index : index + 3]))
            index += 3
            continue
        if char == "\\":
            raise UrlInvalid(
                "has a backslash in its path, which some servers read as '/'", "use '/'"
            )
        pieces.append(char if char in _PATH_CHARACTERS else _percent_encode(char))
        index += 1

    canonical = "".join(pieces)
    for segment in canonical.split("/"):
        if segment.partition(";")[0] in (".", ".."):
            raise UrlInvalid(
                f"has a {segment!r} segment in its path {canonical!r}",
                "give the path without '.' and '..' segments",
            )
    return canonical


def _canonical_escape(escape: str) -> str:
    if len(escape) != 3 or not set(escape[1:]) <= _HEX_DIGITS:
        raise UrlInvalid(
            f"has the invalid percent-escape {escape!r} in its path", "write '%' as '%25'"
        )
    value = int(escape[1:], 16)
    if value in _REJECTED_ESCAPES:
        raise UrlInvalid(
            f"has {escape!r}, an escaped {_REJECTED_ESCAPES[value]}, in its path",
            "rename the file, because servers decode such escapes differently",
        )
    if value < 0x20 or value == 0x7F:
        raise UrlInvalid(
            f"has {escape!r}, an escaped control character, in its path", "rename the file"
        )
    char = chr(value)
    return char if char in _UNRESERVED else f"%{value:02X}"


def _percent_encode(char: str) -> str:
    try:
        encoded = char.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise UrlInvalid(f"contains {char!r}, which is not valid Unicode", "remove it") from exc
    return "".join(f"%{byte:02X}" for byte in encoded)


def _encode_non_ascii(query: str) -> str:
    return "".join(char if char.isascii() else _percent_encode(char) for char in query)


def parse_image_url(text: str, *, allow_http: bool) -> ImageUrl:
    """Return the canonical form of image URL `text`.

    Raises ImageRejected with reason `url_not_allowed` when the scheme is not allowed, the
    URL has credentials, or its host, port or path is invalid.
    """
    try:
        return parse_url(text, allow_http=allow_http)
    except UrlInvalid as exc:
        raise ImageRejected(
            FailureReason.URL_NOT_ALLOWED, f"image URL {exc.problem}; {exc.fix}"
        ) from None


def parse_trusted_source(text: str, *, allow_http: bool) -> TrustedSource:
    """Return the canonical form of one --trusted-image-sources entry.

    Raises UrlInvalid when it is not an absolute URL, has credentials, a query or a fragment,
    or uses http:// while `allow_http` is false.
    """
    url = parse_url(text, allow_http=allow_http)
    if "?" in text or "#" in text:
        raise UrlInvalid("has a query or fragment", "end the source at its path")
    return TrustedSource(
        scheme=url.scheme, host=url.host, port=url.port, path=url.path, address=url.address
    )


def parse_trusted_sources(entries: Sequence[str], *, allow_http: bool) -> list[TrustedSource]:
    """Return the canonical form of every entry, without duplicates, in the given order.

    Raises ValueError naming the first invalid entry, its problem and the fix.
    """
    sources: list[TrustedSource] = []
    for position, entry in enumerate(entries, start=1):
        try:
            source = parse_trusted_source(entry, allow_http=allow_http)
        except UrlInvalid as exc:
            raise ValueError(
                f"{SOURCES_OPTION} entry {position} ({_redact_userinfo(entry)!r}) {exc.problem}; "
                f"{exc.fix}. A source is a URL prefix of scheme, host, optional port and path, "
                f"such as {SOURCE_EXAMPLE}"
            ) from None
        if source not in sources:
            sources.append(source)
    return sources


def _redact_userinfo(entry: str) -> str:
    try:
        parts = urlsplit(entry)
    except ValueError:
        return "<not a URL>"
    if "@" not in parts.netloc:
        return entry
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def trusted_source_for(url: ImageUrl, sources: Sequence[TrustedSource]) -> TrustedSource | None:
    """Return the first source that contains `url`, or None when no source is configured.

    Raises ImageRejected with reason `source_not_trusted` when sources are configured and
    none contains `url`.
    """
    if not sources:
        return None
    for source in sources:
        if source.contains(url):
            return source
    trusted = ", ".join(source.url for source in sources)
    raise ImageRejected(
        FailureReason.SOURCE_NOT_TRUSTED,
        f"image URL {url.display} (origin {url.origin}) is not under a trusted image source; "
        f"{SOURCES_OPTION} lists {trusted}",
    )


def check_addresses(
    url: ImageUrl, addresses: Sequence[IPAddress], *, source: TrustedSource | None
) -> None:
    """Raise ImageRejected unless every address of `url`'s host may be connected to.

    An address passes when `classify` allows it (no loopback, private, link-local or other
    internal range), or when `source`, the trusted source that contains `url`, names that
    address as its host. Reasons: `source_address_denied`, or `download_failed` for an empty
    list.
    """
    if not addresses:
        raise ImageRejected(
            FailureReason.DOWNLOAD_FAILED, f"host {url.host} of {url.origin} has no address"
        )
    for address in addresses:
        if source is not None and source.address == address:
            continue
        decision = classify(address)
        if decision.allowed:
            continue
        example = ImageUrl(
            scheme=url.scheme,
            host=address.compressed,
            port=url.port,
            path="/",
            query="",
            address=address,
        ).text
        if url.address is not None:
            problem = f"image URL host {address} is denied"
            fix = f"add a source that names it, such as {example}, to {SOURCES_OPTION}"
        else:
            problem = f"host {url.host} of {url.origin} resolves to {address}, which is denied"
            fix = (
                f"request the image by that address and add a source that names it, such as "
                f"{example}, to {SOURCES_OPTION}"
            )
        raise ImageRejected(
            FailureReason.SOURCE_ADDRESS_DENIED,
            f"{problem} as {decision.reason.value} ({decision.detail}). Images come from public "
            f"addresses only; to trust this one, {fix}",
        )
