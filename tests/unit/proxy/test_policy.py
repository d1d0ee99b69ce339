"""Tests for the domain policy: host decisions, DNS answer decisions and validation, no network."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from libs.common.decisions import Reason
from services.proxy.policy import DomainPolicy

POLICY = DomainPolicy(
    allowed=("allowed.test", "*.wild.test", "bücher.test", "both.test", "*.mixed.test"),
    blocked=("both.test", "bad.mixed.test", "*.deep.mixed.test"),
)
BLOCKLIST_ONLY = DomainPolicy(blocked=("evil.test", "*.evil.test"))

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "0177.0.0.1",
    "127.1",
    "127.0.0.1.",
    "127.0.0.1:443",
    "user@127.1:80",
]
METADATA_SPELLINGS = [
    "169.254.169.254",
    "2852039166",
    "0xa9fea9fe",
    "0xa9.0xfe.0xa9.0xfe",
    "0251.0376.0251.0376",
    "169.254.43518",
    "0XA9FEA9FE",
]
IPV6_SPELLINGS = [
    "[::ffff:127.0.0.1]",
    "[::ffff:a9fe:a9fe]",
    "[::127.0.0.1]",
    "[2002:a9fe:a9fe::]",
    "[64:ff9b::a9fe:a9fe]",
    "[::]",
    "[::1]",
    "[::1]:443",
    "::1",
    "[2001:db8::1]",
]
ZERO_NETWORK = ["0.0.0.0", "0", "0.0.0.1", "0.1.2.3", "0x0"]


@pytest.mark.parametrize(
    "host",
    [*LOOPBACK_SPELLINGS, *METADATA_SPELLINGS, *IPV6_SPELLINGS, *ZERO_NETWORK, "100.64.0.1"],
)
@pytest.mark.parametrize(
    "policy", [POLICY, BLOCKLIST_ONLY, DomainPolicy()], ids=["allow", "block", "empty"]
)
def test_decide_denies_ip_literals(policy: DomainPolicy, host: str) -> None:
    decision = policy.decide(host)

    assert decision.reason is Reason.IP_LITERAL_DENIED
    assert decision.allowed is False


LITERALS = DomainPolicy(
    allow_ip_literals=(
        "198.51.100.7",
        "2001:db8::7",
        "127.0.0.1",
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
    )
)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("198.51.100.7", Reason.ALLOWED),
        ("198.51.100.7:8443", Reason.ALLOWED),
        ("3325256711", Reason.ALLOWED),  # the same address in decimal
        ("[2001:db8::7]", Reason.ALLOWED),
        ("[2001:DB8:0:0::7]:443", Reason.ALLOWED),
        ("198.51.100.8", Reason.IP_LITERAL_DENIED),
        ("[2001:db8::8]", Reason.IP_LITERAL_DENIED),
        # Listed, but classify still denies them.
        ("127.0.0.1", Reason.ADDRESS_LOOPBACK),
        ("0x7f.1", Reason.ADDRESS_LOOPBACK),
        ("0xa9fea9fe", Reason.ADDRESS_LINK_LOCAL),
        ("[::ffff:a9fe:a9fe]", Reason.ADDRESS_EMBEDDED_IPV4),
        ("100.64.0.1", Reason.ADDRESS_SHARED),
        ("0", Reason.ADDRESS_UNSPECIFIED),
        ("[::1]", Reason.ADDRESS_LOOPBACK),
    ],
)
def test_decide_allowed_ip_literals(host: str, reason: Reason) -> None:
    decision = LITERALS.decide(host)

    assert decision.reason is reason
    assert decision.allowed is (reason is Reason.ALLOWED)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("allowed.test", Reason.ALLOWED),
        ("ALLOWED.TEST", Reason.ALLOWED),
        ("allowed.test.", Reason.ALLOWED),
        ("Allowed.Test.:443", Reason.ALLOWED),
        ("user:pw@allowed.test", Reason.ALLOWED),
        ("allowed.test.evil.test", Reason.HOST_NOT_ALLOWED),
        ("evilallowed.test", Reason.HOST_NOT_ALLOWED),
        ("sub.allowed.test", Reason.HOST_NOT_ALLOWED),  # an exact name does not cover subdomains
        ("allowed.test..", Reason.HOST_INVALID),
        # Userinfo tricks: the host is what follows the '@', and URL delimiters are rejected.
        ("allowed.test@evil.test", Reason.HOST_NOT_ALLOWED),
        ("evil.test#@allowed.test", Reason.HOST_INVALID),
        ("evil.test?@allowed.test", Reason.HOST_INVALID),
        ("evil.test/@allowed.test", Reason.HOST_INVALID),
        ("evil.test\\@allowed.test", Reason.HOST_INVALID),
        ("allowed.test@evil.test@allowed.test", Reason.HOST_INVALID),
        ("allowed.test\x00.evil.test", Reason.HOST_INVALID),
        ("allowed.test evil.test", Reason.HOST_INVALID),
        ("", Reason.HOST_INVALID),
        # Wildcards match below the name, at any depth, but not the name itself.
        ("a.wild.test", Reason.ALLOWED),
        ("a.b.wild.test", Reason.ALLOWED),
        ("wild.test", Reason.HOST_NOT_ALLOWED),
        ("notwild.test", Reason.HOST_NOT_ALLOWED),
        ("a.wild.test.evil.test", Reason.HOST_NOT_ALLOWED),
        # IDNA: the Unicode and the A-label spelling are the same host.
        ("bücher.test", Reason.ALLOWED),
        ("BÜCHER.test", Reason.ALLOWED),
        ("xn--bcher-kva.test", Reason.ALLOWED),
        ("bucher.test", Reason.HOST_NOT_ALLOWED),
        # Homographs: Cyrillic small a (U+0430) and Greek small omicron (U+03BF) make other hosts.
        ("\u0430llowed.test", Reason.HOST_NOT_ALLOWED),
        ("xn--llowed-2nf.test", Reason.HOST_NOT_ALLOWED),
        ("allowed.t\u03bfst", Reason.HOST_NOT_ALLOWED),
        # Block beats allow.
        ("both.test", Reason.HOST_BLOCKED),
        ("BOTH.test.", Reason.HOST_BLOCKED),
        ("ok.mixed.test", Reason.ALLOWED),
        ("bad.mixed.test", Reason.HOST_BLOCKED),
        ("x.deep.mixed.test", Reason.HOST_BLOCKED),
        ("deep.mixed.test", Reason.ALLOWED),  # the blocked wildcard does not cover its apex
    ],
)
def test_decide_with_allowlist(host: str, reason: Reason) -> None:
    decision = POLICY.decide(host)

    assert decision.reason is reason
    assert decision.allowed is (reason is Reason.ALLOWED)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("anything.test", Reason.ALLOWED),
        ("allowed.test@evil.test", Reason.HOST_BLOCKED),
        ("evil.test", Reason.HOST_BLOCKED),
        ("EVIL.TEST.", Reason.HOST_BLOCKED),
        ("www.evil.test", Reason.HOST_BLOCKED),
        ("notevil.test", Reason.ALLOWED),
        ("evil.test.example.test", Reason.ALLOWED),
        ("evil.test#@allowed.test", Reason.HOST_INVALID),
        ("localhost", Reason.ALLOWED),  # names pass; their DNS answer is checked separately
    ],
)
def test_decide_with_blocklist_only(host: str, reason: Reason) -> None:
    decision = BLOCKLIST_ONLY.decide(host)

    assert decision.reason is reason
    assert decision.allowed is (reason is Reason.ALLOWED)


def test_decide_empty_policy_denies_names() -> None:
    assert DomainPolicy().decide("example.test").reason is Reason.HOST_NOT_ALLOWED


def test_decide_detail_names_pattern() -> None:
    assert "'*.wild.test'" in POLICY.decide("a.wild.test").detail
    assert "'both.test'" in POLICY.decide("both.test").detail


PUBLIC_V4 = IPv4Address("198.51.100.7")
PUBLIC_V6 = IPv6Address("2001:db8::7")


@pytest.mark.parametrize(
    ("addresses", "reason"),
    [
        ([PUBLIC_V4], Reason.ALLOWED),
        ([PUBLIC_V4, IPv4Address("203.0.113.9"), PUBLIC_V6], Reason.ALLOWED),
        ([PUBLIC_V4, ip_address("169.254.169.254")], Reason.ADDRESS_LINK_LOCAL),
        ([ip_address("169.254.169.254"), PUBLIC_V4], Reason.ADDRESS_LINK_LOCAL),
        ([PUBLIC_V4, ip_address("127.0.0.1")], Reason.ADDRESS_LOOPBACK),
        ([PUBLIC_V4, ip_address("10.1.2.3")], Reason.ADDRESS_PRIVATE),
        ([PUBLIC_V4, ip_address("100.64.0.1")], Reason.ADDRESS_SHARED),
        ([PUBLIC_V4, ip_address("0.0.0.0")], Reason.ADDRESS_UNSPECIFIED),
        ([PUBLIC_V6, ip_address("::1")], Reason.ADDRESS_LOOPBACK),
        ([PUBLIC_V6, ip_address("fe80::1")], Reason.ADDRESS_LINK_LOCAL),
        ([PUBLIC_V6, ip_address("fd00::1")], Reason.ADDRESS_UNIQUE_LOCAL),
        ([PUBLIC_V6, ip_address("::ffff:169.254.169.254")], Reason.ADDRESS_EMBEDDED_IPV4),
        ([PUBLIC_V6, ip_address("64:ff9b::7f00:1")], Reason.ADDRESS_EMBEDDED_IPV4),
        ([PUBLIC_V4, ip_address("239.1.1.1")], Reason.ADDRESS_MULTICAST),
        ([PUBLIC_V4, ip_address("255.255.255.255")], Reason.ADDRESS_RESERVED),
        ([], Reason.NO_ADDRESSES),
    ],
)
def test_decide_addresses(addresses: list[IPv4Address | IPv6Address], reason: Reason) -> None:
    decision = POLICY.decide_addresses(addresses)

    assert decision.reason is reason
    assert decision.allowed is (reason is Reason.ALLOWED)


def test_decide_addresses_accepts_generator() -> None:
    answer: list[IPv4Address | IPv6Address] = [PUBLIC_V4, PUBLIC_V6]

    decision = POLICY.decide_addresses(address for address in answer)

    assert decision.reason is Reason.ALLOWED


def test_decide_addresses_names_denied_address() -> None:
    decision = POLICY.decide_addresses([PUBLIC_V4, IPv4Address("169.254.169.254")])

    assert "169.254.169.254" in decision.detail


def test_policy_normalises_patterns() -> None:
    policy = DomainPolicy(allowed=("Example.TEST.", "*.BÜCHER.test"))

    assert policy.decide("example.test").reason is Reason.ALLOWED
    assert policy.decide("www.xn--bcher-kva.test").reason is Reason.ALLOWED


@pytest.mark.parametrize(
    ("option", "pattern", "message"),
    [
        ("allowed", "", "invalid host pattern ''"),
        ("allowed", "*", "invalid host pattern '*'"),
        ("allowed", "*.", "invalid host pattern '*.'"),
        ("allowed", "a.*.test", "invalid host pattern 'a.*.test'"),
        ("allowed", "*.*.test", "invalid host pattern '*.*.test'"),
        ("allowed", "exa mple.test", "invalid host pattern 'exa mple.test'"),
        ("allowed", "under_score.test", "invalid host pattern 'under_score.test'"),
        ("allowed", "example.test:443", "invalid host pattern 'example.test:443'"),
        ("allowed", "user@example.test", "invalid host pattern 'user@example.test'"),
        ("allowed", "[::1]", "invalid host pattern '[::1]'"),
        ("allowed", "127.0.0.1", "pattern '127.0.0.1' is an IP literal"),
        ("allowed", "0x7f.1", "pattern '0x7f.1' is an IP literal"),
        ("allowed", "*.0.0.1", "pattern '*.0.0.1' is an IP literal"),
        ("blocked", "example..test", "invalid host pattern 'example..test'"),
        ("blocked", "2130706433", "pattern '2130706433' is an IP literal"),
        ("allow_ip_literals", "0x7f.1", "invalid IP address '0x7f.1'"),
        ("allow_ip_literals", "example.test", "invalid IP address 'example.test'"),
        ("allow_ip_literals", "fe80::1%eth0", "invalid IP address 'fe80::1%eth0'"),
        ("allow_ip_literals", "198.51.100.0/24", "invalid IP address '198.51.100.0/24'"),
    ],
)
def test_policy_rejects_invalid_pattern(option: str, pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + option + ": ") as caught:
        DomainPolicy(**{option: (pattern,)})

    assert message in str(caught.value)


def test_policy_rejects_string_for_tuple() -> None:
    with pytest.raises(TypeError, match="allowed must be a tuple"):
        DomainPolicy(allowed="example.test")  # type: ignore[arg-type]
