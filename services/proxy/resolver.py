"""The proxy's own DNS resolution: one query per name and type, answers cached by TTL.

The proxy resolves an allowed name itself, checks every address of the answer, and connects
to one of those checked addresses, so no second lookup can return something else (DNS
rebinding). A cached answer was checked when it arrived and is reused only for its TTL, capped
by `--dns-cache-seconds`; a TTL of 0 means every request resolves anew and is checked anew.
Queries go only to the configured resolvers, never through the host's search domains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver

logger = logging.getLogger(__name__)

# Answers beyond this many names are dropped oldest first, so a flood of unique names cannot
# grow the cache without bound.
MAX_CACHED_NAMES = 4096


class ResolutionError(Exception):
    """The resolvers gave no usable answer for `name` (timeout, SERVFAIL, malformed reply)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"cannot resolve {name!r}: {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class Answer:
    """Addresses of one name and type; empty when the name or the type does not exist."""

    addresses: tuple[IPv4Address | IPv6Address, ...]
    ttl: int


def system_nameservers() -> list[str]:
    """Return the nameservers of /etc/resolv.conf, as the C resolver would use them."""
    try:
        return [str(server) for server in dns.resolver.Resolver().nameservers]
    except dns.resolver.NoResolverConfiguration:
        return []


class Resolver:
    """Resolve A and AAAA records through fixed nameservers, caching checked answers."""

    def __init__(
        self,
        nameservers: Sequence[str],
        *,
        port: int = 53,
        timeout: float = 3.0,
        cache_seconds: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not nameservers:
            raise ValueError(
                "no upstream DNS resolver: set --upstream-dns or a nameserver in /etc/resolv.conf"
            )
        self._nameservers = list(nameservers)
        self._port = port
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, Answer]] = {}

    async def resolve(self, name: str, rdtype: int) -> Answer:
        """Return the A (`rdtype` 1) or AAAA (28) addresses of the normalised `name`."""
        if rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            raise ValueError(f"record type {rdtype} is not A or AAAA")
        key = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        answer = await self._query(name, rdtype)
        ttl = min(answer.ttl, self._cache_seconds)
        if ttl > 0:
            if len(self._cache) >= MAX_CACHED_NAMES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (self._clock() + ttl, answer)
        else:
            self._cache.pop(key, None)
        return answer

    async def resolve_all(self, name: str) -> Answer:
        """Return the A and AAAA addresses of `name` together, with the shorter TTL."""
        ipv4, ipv6 = await asyncio.gather(
            self.resolve(name, dns.rdatatype.A), self.resolve(name, dns.rdatatype.AAAA)
        )
        return Answer(addresses=ipv4.addresses + ipv6.addresses, ttl=min(ipv4.ttl, ipv6.ttl))

    async def _query(self, name: str, rdtype: int) -> Answer:
        query = dns.message.make_query(name + ".", dns.rdatatype.RdataType.make(rdtype))
        problems = []
        for server in self._nameservers:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    query, server, timeout=self._timeout, port=self._port
                )
            except (dns.exception.DNSException, OSError) as exc:
                problems.append(f"{server}: {type(exc).__name__} {exc}")
                logger.warning("resolver %s failed for %r: %s", server, name, exc)
                continue
            rcode = response.rcode()
            if rcode == dns.rcode.NXDOMAIN:
                return Answer(addresses=(), ttl=_negative_ttl(response))
            if rcode != dns.rcode.NOERROR:
                problems.append(f"{server}: {dns.rcode.to_text(rcode)}")
                continue
            return _addresses(response, rdtype)
        raise ResolutionError(name, "; ".join(problems) or "no resolver returned a response")


def _addresses(response: dns.message.Message, rdtype: int) -> Answer:
    addresses: list[IPv4Address | IPv6Address] = []
    ttls = []
    # Every record of the asked type counts, whichever owner name a CNAME chain gave it, so
    # that no address of the answer escapes the check.
    for rrset in response.answer:
        if rrset.rdtype != rdtype:
            continue
        ttls.append(rrset.ttl)
        addresses.extend(ip_address(rdata.address) for rdata in rrset)
    if not addresses:
        return Answer(addresses=(), ttl=_negative_ttl(response))
    return Answer(addresses=tuple(addresses), ttl=min(ttls))


def _negative_ttl(response: dns.message.Message) -> int:
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return int(min(rrset.ttl, rrset[0].minimum))
    return 0
