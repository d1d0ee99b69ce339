"""The proxy's resolver against a DNS server of the test's own on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from ipaddress import ip_address
from typing import cast

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from services.proxy.resolver import MAX_CACHED_NAMES, Answer, ResolutionError, Resolver

Handler = Callable[[dns.message.Message], dns.message.Message | None]


class FakeDns(asyncio.DatagramProtocol):
    """A UDP DNS server on 127.0.0.1 that answers with `handler` and logs every question."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.questions: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        self.questions.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
        reply = self.handler(query)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply.to_wire(), addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])


def answer(*records: tuple[str, int, str, str], rcode: int = dns.rcode.NOERROR) -> Handler:
    """Return a handler that answers every query with `records` (name, ttl, type, value)."""

    def handle(query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.Rcode.make(rcode))
        for name, ttl, rdtype, value in records:
            if (
                rdtype in ("A", "AAAA")
                and dns.rdatatype.from_text(rdtype) != query.question[0].rdtype
            ):
                continue
            reply.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, value))
        return reply

    return handle


@pytest.fixture
async def server() -> AsyncIterator[FakeDns]:
    loop = asyncio.get_running_loop()
    protocol = FakeDns(answer())
    transport, _ = await loop.create_datagram_endpoint(
        lambda: protocol, local_addr=("127.0.0.1", 0)
    )
    yield protocol
    transport.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(server: FakeDns, clock: Clock | None = None, cache: int = 30) -> Resolver:
    return Resolver(
        ["127.0.0.1"], port=server.port, timeout=0.5, cache_seconds=cache, clock=clock or Clock()
    )


async def test_resolver_returns_a_and_aaaa(server: FakeDns) -> None:
    server.handler = answer(
        ("allowed.test.", 60, "A", "198.51.100.10"),
        ("allowed.test.", 60, "AAAA", "2001:db8::10"),
    )

    result = await resolver(server).resolve_all("allowed.test")

    assert result.addresses == (ip_address("198.51.100.10"), ip_address("2001:db8::10"))
    assert sorted(server.questions) == [("allowed.test.", "A"), ("allowed.test.", "AAAA")]


async def test_every_address_of_a_cname_chain_returned(server: FakeDns) -> None:
    server.handler = answer(
        ("alias.test.", 60, "CNAME", "target.test."),
        ("target.test.", 60, "A", "198.51.100.10"),
        ("target.test.", 60, "A", "169.254.42.42"),
    )

    result = await resolver(server).resolve("alias.test", dns.rdatatype.A)

    assert set(result.addresses) == {ip_address("198.51.100.10"), ip_address("169.254.42.42")}


async def test_nxdomain_is_an_empty_answer(server: FakeDns) -> None:
    server.handler = answer(rcode=dns.rcode.NXDOMAIN)

    result = await resolver(server).resolve("missing.test", dns.rdatatype.A)

    assert result.addresses == ()


async def test_servfail_raises_naming_the_server(server: FakeDns) -> None:
    server.handler = answer(rcode=dns.rcode.SERVFAIL)

    with pytest.raises(ResolutionError) as error:
        await resolver(server).resolve("broken.test", dns.rdatatype.A)

    assert "broken.test" in str(error.value)
    assert "SERVFAIL" in str(error.value)


async def test_silent_server_times_out(server: FakeDns) -> None:
    server.handler = lambda query: None

    with pytest.raises(ResolutionError) as error:
        await resolver(server).resolve("silent.test", dns.rdatatype.A)

    assert "127.0.0.1" in str(error.value)


async def test_answer_cached_for_its_ttl(server: FakeDns) -> None:
    server.handler = answer(("cached.test.", 5, "A", "198.51.100.10"))
    clock = Clock()
    subject = resolver(server, clock)

    await subject.resolve("cached.test", dns.rdatatype.A)
    clock.now += 4.9
    await subject.resolve("cached.test", dns.rdatatype.A)
    assert len(server.questions) == 1

    clock.now += 0.2
    await subject.resolve("cached.test", dns.rdatatype.A)
    assert len(server.questions) == 2


async def test_ttl_zero_resolves_every_time(server: FakeDns) -> None:
    server.handler = answer(("rebind.test.", 0, "A", "198.51.100.10"))
    subject = resolver(server)

    for _ in range(3):
        await subject.resolve("rebind.test", dns.rdatatype.A)

    assert len(server.questions) == 3


async def test_cache_capped_by_setting(server: FakeDns) -> None:
    server.handler = answer(("long.test.", 86400, "A", "198.51.100.10"))
    clock = Clock()
    subject = resolver(server, clock, cache=10)

    await subject.resolve("long.test", dns.rdatatype.A)
    clock.now += 11
    await subject.resolve("long.test", dns.rdatatype.A)

    assert len(server.questions) == 2


async def test_cache_holds_a_bounded_number_of_names(server: FakeDns) -> None:
    subject = resolver(server)
    filler = Answer(addresses=(ip_address("198.51.100.10"),), ttl=60)
    subject._cache = {(f"n{index}.test", 1): (10.0**9, filler) for index in range(MAX_CACHED_NAMES)}
    server.handler = answer(("new.test.", 60, "A", "198.51.100.10"))

    await subject.resolve("new.test", dns.rdatatype.A)

    assert len(subject._cache) == MAX_CACHED_NAMES
    assert ("n0.test", 1) not in subject._cache


def test_no_nameserver_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--upstream-dns"):
        Resolver([])


async def test_other_types_refused(server: FakeDns) -> None:
    with pytest.raises(ValueError, match="not A or AAAA"):
        await resolver(server).resolve("x.test", dns.rdatatype.TXT)

    assert server.questions == []
