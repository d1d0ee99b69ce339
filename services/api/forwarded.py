"""Client addresses of gateway requests: the TCP peer, or what trusted proxies report.

The rate limiter counts per client address, so a client must not be able to choose its
address. Forwarded headers are read only when the TCP peer is in `--trusted-proxies`, and
then only the one header that those proxies set (`--forwarded-header`). A proxy passes every
other header through unchanged, so honouring a second one would let a client write its own
address there.

Each proxy appends the address it received the request from, so the chain is walked from the
right: the first address that is not a trusted proxy is the client. Addresses to its left were
written by the client or by proxies nobody vouches for, and are never read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

logger = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

# How many hops of a chain are read, from the right; a longer chain is cut at this hop.
MAX_HOPS = 32
# IPv6 clients are counted per /64, the smallest prefix an ISP routes to one customer, so a
# client cannot get a fresh bucket for each of the addresses of its own network.
IPV6_BUCKET_PREFIX = 64
UNKNOWN = "unknown"
# Client addresses of direct peers kept for reuse, because parsing an address costs more than
# the rest of the lookup. The cache is emptied whenever it is full.
MAX_CACHED_PEERS = 4096


class ForwardedHeader(StrEnum):
    """The header in which trusted proxies pass on the address they received a request from."""

    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"
    X_REAL_IP = "x-real-ip"


@dataclass(frozen=True)
class ClientAddress:
    """Origin of a request.

    `address` is the client's address as text, or `unknown` when the server gave no IP
    address, as for a Unix socket. `bucket` is the rate-limit identity derived from it. `peer`
    is the TCP peer that delivered the request, which differs from `address` behind a
    trusted proxy.
    """

    address: str
    bucket: str
    peer: str


def parse_address(text: str) -> IPAddress | None:
    """Return the address in `text`, or None when it is not one.

    Accepts `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`, `[2001:db8::1]` and
    `[2001:db8::1]:80`. An IPv6 zone is dropped and an IPv4-mapped IPv6 address becomes the
    IPv4 address, so that each client has one spelling.
    """
    value = text.strip()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not _is_port(rest)):
            return None
        value = host
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
        if not port.isdigit():
            return None
        value = host
    value = value.partition("%")[0]
    try:
        address = ip_address(value)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and len(text) <= 6


def bucket_of(address: IPAddress) -> str:
    """Return the rate-limit identity of `address`: itself for IPv4, its /64 for IPv6."""
    if isinstance(address, IPv6Address):
        return str(IPv6Network((address, IPV6_BUCKET_PREFIX), strict=False))
    return str(address)


def split_list(values: Iterable[str]) -> list[str]:
    """Return the comma-separated entries of one or more header lines, in order."""
    return [entry.strip() for value in values for entry in value.split(",")]


def forwarded_for(values: Iterable[str]) -> list[str]:
    """Return the `for=` value of each element of RFC 7239 `Forwarded` header lines.

    An element without `for=` gives an empty string, so that it still counts as a hop.
    Quoted strings may contain `,` and `;`, and a backslash quotes the next character.
    """
    hops: list[str] = []
    for element in _split_outside_quotes(",".join(values), ","):
        found = ""
        for pair in _split_outside_quotes(element, ";"):
            name, equals, value = pair.partition("=")
            if equals and name.strip().lower() == "for":
                found = _unquote(value.strip())
        hops.append(found)
    return hops


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    if len(value) < 2 or not (value.startswith('"') and value.endswith('"')):
        return value
    unquoted: list[str] = []
    escaped = False
    for char in value[1:-1]:
        if char == "\\" and not escaped:
            escaped = True
            continue
        unquoted.append(char)
        escaped = False
    return "".join(unquoted)


class ClientAddressResolver:
    """Find the client address of a request from its peer and, behind a proxy, its headers."""

    def __init__(
        self,
        trusted_proxies: Sequence[IPNetwork] = (),
        *,
        header: ForwardedHeader = ForwardedHeader.X_FORWARDED_FOR,
    ) -> None:
        self._trusted = tuple(trusted_proxies)
        self._header = header.value.encode()
        self._kind = header
        self._direct: dict[str, ClientAddress] = {}

    def is_trusted(self, address: IPAddress) -> bool:
        """Return whether `address` is one of the trusted proxies."""
        return any(
            address.version == network.version and address in network for network in self._trusted
        )

    def resolve(self, peer: str | None, headers: Sequence[tuple[bytes, bytes]]) -> ClientAddress:
        """Return the client address of a request from `peer` with raw ASGI `headers`."""
        if not peer:
            return ClientAddress(address=UNKNOWN, bucket=UNKNOWN, peer=UNKNOWN)
        cached = self._direct.get(peer)
        if cached is not None:
            return cached
        peer_address = parse_address(peer)
        if peer_address is None:
            return ClientAddress(address=UNKNOWN, bucket=UNKNOWN, peer=peer)
        if self._trusted and self.is_trusted(peer_address):
            client = self._walk(peer_address, self._chain(headers))
            return ClientAddress(
                address=str(client), bucket=bucket_of(client), peer=str(peer_address)
            )

        # The headers of an untrusted peer are never read, so its address depends on `peer`
        # alone and can be reused.
        direct = ClientAddress(
            address=str(peer_address), bucket=bucket_of(peer_address), peer=str(peer_address)
        )
        if len(self._direct) >= MAX_CACHED_PEERS:
            self._direct.clear()
        self._direct[peer] = direct
        return direct

    def _chain(self, headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
        values = [
            value.decode("latin-1") for name, value in headers if name.lower() == self._header
        ]
        if self._kind is ForwardedHeader.FORWARDED:
            return forwarded_for(values)
        return split_list(values)

    def _walk(self, peer: IPAddress, chain: list[str]) -> IPAddress:
        current = peer
        for entry in reversed(chain[-MAX_HOPS:]):
            hop = parse_address(entry)
            if hop is None:
                # Only a trusted proxy can have written this entry, so the chain is broken:
                # the last trusted hop is the best address known.
                logger.warning(
                    "trusted proxy %s forwarded %s entry %r, which is not an IP address; "
                    "counting the request against the proxy",
                    current,
                    self._kind.value,
                    entry[:64],
                )
                return current
            current = hop
            if not self.is_trusted(hop):
                return hop
        return current
