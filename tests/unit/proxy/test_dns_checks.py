"""Tests for the first checks of a DNS query: record types, classes and question names."""

from __future__ import annotations

import base64

import pytest

from libs.common.decisions import Reason
from services.proxy.dns_checks import (
    MAX_ECHOED_CHARACTERS,
    QueryNameInvalid,
    check_query,
    normalized_query_name,
)

A, AAAA = 1, 28
IN, CH, HS, ANY_CLASS = 1, 3, 4, 255

# 189 random-looking bytes as unpadded base32: three full 63-octet labels, the way a DNS
# tunnel packs its payload.
TUNNEL_PAYLOAD = base64.b32encode(bytes(range(118))).decode().rstrip("=")[:189]
TUNNEL_LABELS = [TUNNEL_PAYLOAD[i : i + 63] for i in range(0, 189, 63)]
TUNNEL_NAME = ".".join([*TUNNEL_LABELS, "t.tunnel.test"])

LABEL_63 = "a" * 63
LABEL_64 = "a" * 64
# Four 62-octet labels and three dots: 251 octets, then a two-octet label makes 254.
NAME_251 = ".".join(["b" * 62] * 4)
NAME_253 = NAME_251 + ".c"
NAME_254 = NAME_251 + ".cc"


@pytest.mark.parametrize(
    ("qtype", "mnemonic"),
    [
        (16, "TXT"),
        (10, "NULL"),
        (255, "ANY"),
        (15, "MX"),
        (5, "CNAME"),
        (33, "SRV"),
        (65, "HTTPS"),
        (64, "SVCB"),
        (252, "AXFR"),
        (251, "IXFR"),
        (12, "PTR"),
        (2, "NS"),
        (6, "SOA"),
        (0, "TYPE0"),
        (65280, "TYPE65280"),
        (65535, "TYPE65535"),
    ],
)
def test_check_query_refuses_type(qtype: int, mnemonic: str) -> None:
    decision = check_query("allowed.test", qtype, IN)

    assert decision.reason is Reason.DNS_TYPE_REFUSED
    assert decision.allowed is False
    assert f"{mnemonic} ({qtype})" in decision.detail
    assert "'allowed.test'" in decision.detail


@pytest.mark.parametrize("qtype", [-1, 65536, 2**40])
def test_out_of_range_type_refused(qtype: int) -> None:
    decision = check_query("allowed.test", qtype, IN)

    assert decision.reason is Reason.DNS_TYPE_REFUSED
    assert f"invalid type number {qtype}" in decision.detail


@pytest.mark.parametrize(
    ("qclass", "mnemonic"),
    [(CH, "CH"), (HS, "HS"), (ANY_CLASS, "ANY"), (254, "NONE"), (0, "RESERVED0"), (99, "CLASS99")],
)
@pytest.mark.parametrize("qtype", [A, AAAA, 16])
def test_check_query_refuses_class(qtype: int, qclass: int, mnemonic: str) -> None:
    decision = check_query("version.bind", qtype, qclass)

    assert decision.reason is Reason.DNS_TYPE_REFUSED
    assert f"class {mnemonic} ({qclass})" in decision.detail


def test_type_checked_before_name() -> None:
    decision = check_query("bad_name..test", 16, IN)

    assert decision.reason is Reason.DNS_TYPE_REFUSED


@pytest.mark.parametrize(
    ("name", "normalised"),
    [
        ("allowed.test", "allowed.test"),
        ("allowed.test.", "allowed.test"),
        ("ALLOWED.Test.", "allowed.test"),
        ("bücher.test", "xn--bcher-kva.test"),
        ("BÜCHER.TEST.", "xn--bcher-kva.test"),
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        # UTS #46 drops variation selectors, so the filter must query the normalised name.
        ("a\ufe0f.test", "a.test"),
        ("single", "single"),
        ("a-b.test", "a-b.test"),
        (f"{LABEL_63}.test", f"{LABEL_63}.test"),
        (NAME_253, NAME_253),
        (f"{NAME_253}.", NAME_253),
        (TUNNEL_NAME, TUNNEL_NAME.lower()),
        # Valid DNS names; DomainPolicy.decide denies them as IP literals.
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "2130706433"),
    ],
)
@pytest.mark.parametrize("qtype", [A, AAAA])
def test_check_query_allows_valid_name(qtype: int, name: str, normalised: str) -> None:
    decision = check_query(name, qtype, IN)

    assert decision.reason is Reason.ALLOWED
    assert decision.allowed is True
    assert repr(normalised) in decision.detail
    assert normalized_query_name(name) == normalised


def test_tunnel_name_uses_full_labels() -> None:
    assert [len(label) for label in TUNNEL_LABELS] == [63, 63, 63]
    assert len(TUNNEL_NAME) <= 253


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty name"),
        (".", "empty name"),
        ("..", "label 1 is empty"),
        (".allowed.test", "label 1 is empty"),
        ("allowed..test", "label 2 is empty"),
        ("allowed.test..", "label 3 is empty"),
        (f"{LABEL_64}.test", "label 1 is 64 octets, the maximum is 63"),
        (f"x.{LABEL_64}", "label 2 is 64 octets, the maximum is 63"),
        (NAME_254, "name is 254 octets without the trailing dot, the maximum is 253"),
        (f"{NAME_254}.", "name is 254 octets without the trailing dot, the maximum is 253"),
        ("ü" * 64 + ".test", "IDNA encoding failed"),
        ("_dmarc.allowed.test", "label '_dmarc' is not letters, digits and inner hyphens"),
        ("a_b.allowed.test", "label 'a_b' is not letters, digits and inner hyphens"),
        ("*.allowed.test", "label '*' is not letters, digits and inner hyphens"),
        ("-lead.test", "label '-lead' is not letters"),
        ("trail-.test", "label 'trail-' is not letters"),
        ("a=b.test", "label 'a=b' is not letters"),
        ("xn--.test", "label 'xn--' is not letters"),
        ("payload@allowed.test", "character '@' is not allowed in a DNS name"),
        ("allowed.test:53", "character ':' is not allowed in a DNS name"),
        ("[::1]", "character '[' is not allowed in a DNS name"),
        ("::1", "character ':' is not allowed in a DNS name"),
        ("a\\.b.test", "character '\\\\' is not allowed in a host"),
        ("a\\000.test", "character '\\\\' is not allowed in a host"),
        ("a b.test", "character ' ' is not allowed in a host"),
        ("a\x00b.test", "character '\\x00' is not allowed in a host"),
        ("a\nb.test", "character '\\n' is not allowed in a host"),
        ("a/b.test", "character '/' is not allowed in a host"),
        ("a\u200bb.test", "character '\\u200b' is not allowed in a host"),
        ("x" * 2000, "name is 2000 characters, the maximum is 253 octets"),
    ],
)
@pytest.mark.parametrize("qtype", [A, AAAA])
def test_check_query_rejects_invalid_name(qtype: int, name: str, problem: str) -> None:
    decision = check_query(name, qtype, IN)

    assert decision.reason is Reason.DNS_NAME_INVALID
    assert decision.allowed is False
    assert problem in decision.detail
    with pytest.raises(QueryNameInvalid) as caught:
        normalized_query_name(name)
    assert problem in caught.value.problem
    assert caught.value.name == name


@pytest.mark.parametrize(
    "name",
    [
        "x" * 2000,
        ".".join([LABEL_63] * 4) + ".test",
        f"{LABEL_64}.{LABEL_63}",
        "ü" * 300 + ".test",
        TUNNEL_NAME + "_",
    ],
)
def test_invalid_name_detail_is_truncated(name: str) -> None:
    decision = check_query(name, A, IN)

    assert decision.reason is Reason.DNS_NAME_INVALID
    assert name not in decision.detail
    assert f"... ({len(name)} characters)" in decision.detail
    assert len(decision.detail) < 2 * MAX_ECHOED_CHARACTERS + 200


def test_refused_type_detail_is_truncated() -> None:
    name = TUNNEL_NAME * 4

    decision = check_query(name, 16, IN)

    assert decision.reason is Reason.DNS_TYPE_REFUSED
    assert name not in decision.detail
    assert f"... ({len(name)} characters)" in decision.detail


def test_query_name_invalid_is_value_error() -> None:
    with pytest.raises(ValueError, match=r"invalid DNS name 'a\.\.b': label 2 is empty"):
        normalized_query_name("a..b")
