"""Tests for address classification: each denied range and its reason code, no network."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from libs.common.addresses import classify
from libs.common.decisions import Reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("0.0.0.0", Reason.ADDRESS_UNSPECIFIED),
        ("0.0.0.1", Reason.ADDRESS_UNSPECIFIED),
        ("0.1.2.3", Reason.ADDRESS_UNSPECIFIED),
        ("0.255.255.255", Reason.ADDRESS_UNSPECIFIED),
        ("10.0.0.1", Reason.ADDRESS_PRIVATE),
        ("10.255.255.255", Reason.ADDRESS_PRIVATE),
        ("100.64.0.1", Reason.ADDRESS_SHARED),
        ("100.127.255.255", Reason.ADDRESS_SHARED),
        ("127.0.0.1", Reason.ADDRESS_LOOPBACK),
        ("127.255.255.254", Reason.ADDRESS_LOOPBACK),
        ("169.254.169.254", Reason.ADDRESS_LINK_LOCAL),
        ("169.254.0.1", Reason.ADDRESS_LINK_LOCAL),
        ("172.16.0.1", Reason.ADDRESS_PRIVATE),
        ("172.31.255.255", Reason.ADDRESS_PRIVATE),
        ("192.168.1.1", Reason.ADDRESS_PRIVATE),
        ("224.0.0.1", Reason.ADDRESS_MULTICAST),
        ("239.255.255.250", Reason.ADDRESS_MULTICAST),
        ("240.0.0.1", Reason.ADDRESS_RESERVED),
        ("255.255.255.255", Reason.ADDRESS_RESERVED),
        ("::", Reason.ADDRESS_UNSPECIFIED),
        ("::1", Reason.ADDRESS_LOOPBACK),
        ("fe80::1", Reason.ADDRESS_LINK_LOCAL),
        ("febf:ffff::1", Reason.ADDRESS_LINK_LOCAL),
        ("fec0::1", Reason.ADDRESS_PRIVATE),
        ("fc00::1", Reason.ADDRESS_UNIQUE_LOCAL),
        ("fd12:3456::1", Reason.ADDRESS_UNIQUE_LOCAL),
        ("ff02::1", Reason.ADDRESS_MULTICAST),
        ("ff0e::1", Reason.ADDRESS_MULTICAST),
    ],
)
def test_classify_denies_range(address: str, reason: Reason) -> None:
    decision = classify(ip_address(address))

    assert decision.reason is reason
    assert decision.allowed is False
    assert address in decision.detail


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:a9fe:a9fe", "169.254.169.254"),
        ("::ffff:198.51.100.7", "198.51.100.7"),  # denied even when the IPv4 address is public
        ("::127.0.0.1", "127.0.0.1"),
        ("::a9fe:a9fe", "169.254.169.254"),
        ("::ffff:0:a9fe:a9fe", "169.254.169.254"),
        ("2002:a9fe:a9fe::", "169.254.169.254"),
        ("2002:7f00:1::1", "127.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("64:ff9b::127.0.0.1", "127.0.0.1"),
        ("64:ff9b:1::a9fe:a9fe", "169.254.169.254"),
        # Teredo: server 65.54.227.120, client 127.0.0.1 stored with every bit inverted.
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),
    ],
)
def test_classify_denies_embedded_ipv4(address: str, embedded: str) -> None:
    decision = classify(ip_address(address))

    assert decision.reason is Reason.ADDRESS_EMBEDDED_IPV4
    assert decision.allowed is False
    assert f"IPv4 {embedded} " in decision.detail


@pytest.mark.parametrize(
    "address",
    [
        "198.51.100.1",
        "198.51.100.255",
        "203.0.113.10",
        "192.0.2.1",
        "2001:db8::1",
        "2001:db8:ffff::1",
        "1.1.1.1",
        "8.8.8.8",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.167.255.255",
        "192.169.0.0",
        "223.255.255.255",
        "2606:4700::1111",
        "2001:1::1",  # outside the Teredo /32
        "64:ff9b:2::1",  # outside both NAT64 prefixes
    ],
)
def test_classify_allows_public(address: str) -> None:
    decision = classify(ip_address(address))

    assert decision.reason is Reason.ALLOWED
    assert decision.allowed is True
