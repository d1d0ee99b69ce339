"""Client addresses from the peer and from forwarded headers of trusted proxies."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_network

import pytest

from services.api import forwarded
from services.api.forwarded import (
    MAX_HOPS,
    ClientAddressResolver,
    ForwardedHeader,
    bucket_of,
    forwarded_for,
    parse_address,
    split_list,
)

PROXY = "198.51.100.10"
TRUSTED = [ip_network("198.51.100.0/28"), ip_network("2001:db8:ffff::/48")]
CLIENT = "203.0.113.7"


def resolver(header: ForwardedHeader = ForwardedHeader.X_FORWARDED_FOR) -> ClientAddressResolver:
    return ClientAddressResolver(TRUSTED, header=header)


def raw(headers: dict[str, str] | list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    items = headers.items() if isinstance(headers, dict) else headers
    return [(name.lower().encode(), value.encode("latin-1")) for name, value in items]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("203.0.113.7", IPv4Address("203.0.113.7"), id="ipv4"),
        pytest.param(" 203.0.113.7 ", IPv4Address("203.0.113.7"), id="padded"),
        pytest.param("203.0.113.7:8080", IPv4Address("203.0.113.7"), id="ipv4-port"),
        pytest.param("2001:db8::1", IPv6Address("2001:db8::1"), id="ipv6"),
        pytest.param("[2001:db8::1]", IPv6Address("2001:db8::1"), id="ipv6-brackets"),
        pytest.param("[2001:db8::1]:443", IPv6Address("2001:db8::1"), id="ipv6-port"),
        pytest.param("fe80::1%eth0", IPv6Address("fe80::1"), id="zone"),
        pytest.param("::ffff:203.0.113.7", IPv4Address("203.0.113.7"), id="mapped"),
        pytest.param("[::ffff:203.0.113.7]:80", IPv4Address("203.0.113.7"), id="mapped-port"),
        pytest.param("", None, id="empty"),
        pytest.param("unknown", None, id="unknown"),
        pytest.param("_hidden", None, id="obfuscated"),
        pytest.param("example.test", None, id="name"),
        pytest.param("203.0.113.7:http", None, id="named-port"),
        pytest.param("203.0.113.256", None, id="octet-over-255"),
        pytest.param("0203.0.113.7", None, id="leading-zero"),
        pytest.param("[2001:db8::1", None, id="unclosed-bracket"),
        pytest.param("[2001:db8::1]x", None, id="junk-after-bracket"),
        pytest.param("[203.0.113.7]:", None, id="empty-port"),
    ],
)
def test_parse_address(text: str, expected: IPv4Address | IPv6Address | None) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (IPv4Address("203.0.113.7"), "203.0.113.7"),
        (IPv6Address("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64"),
        (IPv6Address("2001:db8:1:2::ffff"), "2001:db8:1:2::/64"),
    ],
)
def test_bucket_of(address: IPv4Address | IPv6Address, expected: str) -> None:
    assert bucket_of(address) == expected


def test_split_list_joins_header_lines() -> None:
    assert split_list(["198.51.100.1, 198.51.100.2", "198.51.100.3"]) == [
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.3",
    ]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param(["for=192.0.2.60"], ["192.0.2.60"], id="plain"),
        pytest.param(["For=192.0.2.60;proto=http"], ["192.0.2.60"], id="name-case"),
        pytest.param(['for="[2001:db8:cafe::17]:4711"'], ["[2001:db8:cafe::17]:4711"], id="v6"),
        pytest.param(
            ["for=192.0.2.43, for=198.51.100.17"], ["192.0.2.43", "198.51.100.17"], id="two-hops"
        ),
        pytest.param(
            ["for=192.0.2.43", "for=198.51.100.17;by=203.0.113.60"],
            ["192.0.2.43", "198.51.100.17"],
            id="two-lines",
        ),
        pytest.param(["proto=https;by=203.0.113.43"], [""], id="no-for"),
        pytest.param(['for="a,b;c", for=192.0.2.1'], ["a,b;c", "192.0.2.1"], id="quoted-comma"),
        pytest.param([r'for="a\"b"'], ['a"b'], id="escaped-quote"),
        pytest.param(["for=unknown"], ["unknown"], id="unknown"),
    ],
)
def test_forwarded_for(values: list[str], expected: list[str]) -> None:
    assert forwarded_for(values) == expected


SPOOFING_HEADERS = [
    pytest.param({"X-Forwarded-For": "198.51.100.99"}, id="xff"),
    pytest.param({"X-Forwarded-For": f"198.51.100.99, {PROXY}"}, id="xff-chain"),
    pytest.param({"Forwarded": "for=198.51.100.99"}, id="forwarded"),
    pytest.param({"X-Real-IP": "198.51.100.99"}, id="x-real-ip"),
    pytest.param(
        {
            "X-Forwarded-For": "203.0.113.201",
            "Forwarded": "for=203.0.113.202",
            "X-Real-IP": "203.0.113.203",
        },
        id="all-three",
    ),
]


@pytest.mark.parametrize("headers", SPOOFING_HEADERS)
@pytest.mark.parametrize("header", list(ForwardedHeader))
def test_untrusted_peer_headers_ignored(headers: dict[str, str], header: ForwardedHeader) -> None:
    client = resolver(header).resolve(CLIENT, raw(headers))

    assert client.address == CLIENT
    assert client.bucket == CLIENT
    assert client.peer == CLIENT


def test_no_trusted_proxies_ignores_headers() -> None:
    client = ClientAddressResolver().resolve(PROXY, raw({"X-Forwarded-For": CLIENT}))

    assert client.address == PROXY


@pytest.mark.parametrize(
    ("header", "headers"),
    [
        pytest.param(ForwardedHeader.X_FORWARDED_FOR, {"X-Forwarded-For": CLIENT}, id="xff"),
        pytest.param(ForwardedHeader.FORWARDED, {"Forwarded": f"for={CLIENT}"}, id="forwarded"),
        pytest.param(ForwardedHeader.X_REAL_IP, {"X-Real-IP": CLIENT}, id="x-real-ip"),
    ],
)
def test_trusted_proxy_header_honoured(header: ForwardedHeader, headers: dict[str, str]) -> None:
    client = resolver(header).resolve(PROXY, raw(headers))

    assert client.address == CLIENT
    assert client.peer == PROXY


@pytest.mark.parametrize(
    ("header", "headers"),
    [
        pytest.param(
            ForwardedHeader.X_FORWARDED_FOR,
            {"Forwarded": "for=198.51.100.99", "X-Real-IP": "198.51.100.98"},
            id="xff-configured",
        ),
        pytest.param(
            ForwardedHeader.FORWARDED,
            {"X-Forwarded-For": "198.51.100.99", "X-Real-IP": "198.51.100.98"},
            id="forwarded-configured",
        ),
        pytest.param(
            ForwardedHeader.X_REAL_IP,
            {"X-Forwarded-For": "198.51.100.99", "Forwarded": "for=198.51.100.98"},
            id="x-real-ip-configured",
        ),
    ],
)
def test_other_headers_ignored_behind_proxy(
    header: ForwardedHeader, headers: dict[str, str]
) -> None:
    # The proxy does not set these, so the client wrote them.
    client = resolver(header).resolve(PROXY, raw(headers))

    assert client.address == PROXY


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        pytest.param(f"{CLIENT}", CLIENT, id="one-hop"),
        pytest.param(f"{CLIENT}, 198.51.100.11", CLIENT, id="two-trusted-hops"),
        pytest.param(f"203.0.113.201, {CLIENT}, 198.51.100.11", CLIENT, id="spoofed-left-part"),
        pytest.param(f"garbage, {CLIENT}", CLIENT, id="garbage-left-of-client"),
        pytest.param("198.51.100.12, 198.51.100.11", "198.51.100.12", id="all-trusted"),
        pytest.param(f"{CLIENT}, garbage", PROXY, id="garbage-from-proxy"),
        pytest.param(f"{CLIENT}, ", PROXY, id="empty-entry-from-proxy"),
        pytest.param(f"[2001:db8::7]:5000, {PROXY}", "2001:db8::7", id="ipv6-client"),
    ],
)
def test_chain_walked_from_right(chain: str, expected: str) -> None:
    client = resolver().resolve(PROXY, raw({"X-Forwarded-For": chain}))

    assert client.address == expected


def test_chain_over_several_header_lines() -> None:
    headers = raw(
        [("X-Forwarded-For", "203.0.113.201"), ("X-Forwarded-For", f"{CLIENT}, 198.51.100.11")]
    )

    assert resolver().resolve(PROXY, headers).address == CLIENT


def test_chain_read_at_most_max_hops() -> None:
    chain = ", ".join([CLIENT] + ["198.51.100.11"] * MAX_HOPS)

    client = resolver().resolve(PROXY, raw({"X-Forwarded-For": chain}))

    assert client.address == "198.51.100.11"


def test_forwarded_chain_walked_from_right() -> None:
    value = f'for=203.0.113.201, for="[2001:db8::7]:5000", for={PROXY}'

    client = resolver(ForwardedHeader.FORWARDED).resolve("198.51.100.11", raw({"Forwarded": value}))

    assert client.address == "2001:db8::7"
    assert client.bucket == "2001:db8::/64"


def test_forwarded_element_without_for_stops_walk() -> None:
    value = f"for={CLIENT}, proto=https"

    client = resolver(ForwardedHeader.FORWARDED).resolve(PROXY, raw({"Forwarded": value}))

    assert client.address == PROXY


def test_trusted_ipv6_proxy() -> None:
    client = resolver().resolve("2001:db8:ffff::1", raw({"X-Forwarded-For": CLIENT}))

    assert client.address == CLIENT


def test_ipv6_peer_bucketed_by_prefix() -> None:
    first = resolver().resolve("2001:db8:1:2::1", [])
    second = resolver().resolve("2001:db8:1:2:ffff::9", [])

    assert first.address != second.address
    assert first.bucket == second.bucket == "2001:db8:1:2::/64"


@pytest.mark.parametrize("peer", [None, "testclient", ""])
def test_peer_without_address_is_unknown(peer: str | None) -> None:
    client = resolver().resolve(peer, raw({"X-Forwarded-For": CLIENT}))

    assert client.address == "unknown"
    assert client.bucket == "unknown"


def test_direct_peer_resolved_once_then_reused() -> None:
    addresses = resolver()

    first = addresses.resolve(CLIENT, raw({"X-Forwarded-For": "198.51.100.99"}))
    second = addresses.resolve(CLIENT, raw({"X-Forwarded-For": "198.51.100.98"}))

    assert second is first
    assert second.address == CLIENT


def test_trusted_proxy_reads_headers_every_time() -> None:
    addresses = resolver()

    first = addresses.resolve(PROXY, raw({"X-Forwarded-For": CLIENT}))
    second = addresses.resolve(PROXY, raw({"X-Forwarded-For": "203.0.113.8"}))

    assert first.address == CLIENT
    assert second.address == "203.0.113.8"


def test_peer_cache_emptied_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarded, "MAX_CACHED_PEERS", 2)
    addresses = resolver()
    first = addresses.resolve("203.0.113.1", [])
    addresses.resolve("203.0.113.2", [])

    addresses.resolve("203.0.113.3", [])
    again = addresses.resolve("203.0.113.1", [])

    assert again is not first
    assert again == first
