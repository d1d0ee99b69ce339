"""Tests for host normalisation and IP literal parsing; pure functions, no network."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from libs.common.hosts import HostInvalid, normalize_host, parse_ip_literal, parse_ipv4_literal

LOOPBACK = IPv4Address("127.0.0.1")
METADATA = IPv4Address("169.254.169.254")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.test", "example.test"),
        ("EXAMPLE.Test", "example.test"),
        ("example.test.", "example.test"),
        ("example.test:443", "example.test"),
        ("example.test.:8080", "example.test"),
        ("user:pw@example.test", "example.test"),
        ("user@example.test:443", "example.test"),
        ("allowed.test@evil.test", "evil.test"),
        ("@example.test", "example.test"),
        ("a-b.c1.test", "a-b.c1.test"),
        ("bücher.test", "xn--bcher-kva.test"),
        ("BÜCHER.test", "xn--bcher-kva.test"),
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        # Full-width "example", which UTS #46 maps to ASCII.
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.test", "example.test"),
        ("[::1]", "::1"),
        ("[::1]:443", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("[::FFFF:127.0.0.1]", "::ffff:7f00:1"),
        ("::1", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("0x7F.1", "0x7f.1"),
        ("2130706433", "2130706433"),
        ("localhost", "localhost"),
        ("a" * 63 + ".test", "a" * 63 + ".test"),
        (".".join(["a" * 63] * 3 + ["a" * 61]), ".".join(["a" * 63] * 3 + ["a" * 61])),
    ],
)
def test_normalize_host_accepts(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "example.test..",
        ".example.test",
        "example..test",
        "example.test:",
        "example.test:port",
        "example.test:65536",
        "example.test:-1",
        "example.test:443:443",
        "evil.test#@allowed.test",
        "evil.test/@allowed.test",
        "evil.test?@allowed.test",
        "evil.test\\@allowed.test",
        "a@b@example.test",
        "example test",
        "example.test ",
        " example.test",
        "example.test\t",
        "example.test\n",
        "example.test\r\nX-Injected: 1",
        "example\x00.test",
        "exa\u200bmple.test",  # zero-width space
        "exa\u00admple.test",  # soft hyphen, which IDNA2003 would map to nothing
        "example\u3000.test",  # ideographic space
        "under_score.test",
        "*.example.test",
        "-leading.test",
        "trailing-.test",
        "per%2ecent.test",
        "a" * 64 + ".test",
        ".".join(["a" * 63] * 4),
        "xn--zz.test\u00e9",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[::1]:99999",
        "[127.0.0.1]",
        "[fe80::1%eth0]",
        "[fe80::1%25eth0]",
        "fe80::1%eth0",
        "::1::2",
        "1:2:3",
        "[example.test]",
        "\u0430\u0431\u0432\u2024test",  # one-dot leader, which UTS #46 disallows
    ],
)
def test_normalize_host_rejects(raw: str) -> None:
    with pytest.raises(HostInvalid) as caught:
        normalize_host(raw)

    assert caught.value.host == raw
    assert repr(raw) in str(caught.value)


def test_normalize_host_keeps_homograph_distinct() -> None:
    # Cyrillic small letter a (U+0430) in place of the Latin one.
    assert normalize_host("\u0430llowed.test") == "xn--llowed-2nf.test"


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "127.1",
        "127.0.1",
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0x7f.1",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "0177.1",
        "017700000001",
        "127.000.000.001",
        "0x7f.0x0.0x0.0x1",
        "0x0000007f.1",
    ],
)
def test_parse_ipv4_literal_spellings_of_loopback(text: str) -> None:
    assert parse_ipv4_literal(text) == LOOPBACK


@pytest.mark.parametrize(
    "text",
    [
        "169.254.169.254",
        "2852039166",
        "0xa9fea9fe",
        "0xA9FEA9FE",
        "0xa9.0xfe.0xa9.0xfe",
        "0251.0376.0251.0376",
        "169.254.43518",
        "169.16689662",
        "0xa9.0xfe.0xa9fe",
        "0251.0xfe.169.254",
    ],
)
def test_parse_ipv4_literal_spellings_of_metadata(text: str) -> None:
    assert parse_ipv4_literal(text) == METADATA


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", "0.0.0.0"),
        ("0.0.0.0", "0.0.0.0"),
        ("00", "0.0.0.0"),
        ("0x0", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
        ("0xffffffff", "255.255.255.255"),
        ("1.16777215", "1.255.255.255"),
        ("1.2.65535", "1.2.255.255"),
        ("198.51.100.7", "198.51.100.7"),
    ],
)
def test_parse_ipv4_literal_values(text: str, expected: str) -> None:
    assert parse_ipv4_literal(text) == IPv4Address(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "1.",
        ".1",
        "1..1",
        "1.2.3.4.5",
        "1.2.3.4.",
        "256.0.0.1",
        "1.256.0.1",
        "1.2.256.1",
        "1.2.3.256",
        "1.2.65536",
        "1.16777216",
        "4294967296",
        "0x100000000",
        "0x",
        "0x.1",
        "08",
        "09.1",
        "0x1g",
        "1a",
        "+1",
        "-1",
        " 1",
        "1 ",
        "127.0.0.1 extra",
        "1e3",
        "\u0661\u0662\u0667.0.0.1",  # Arabic-Indic digits
        "example.test",
        "::1",
    ],
)
def test_parse_ipv4_literal_rejects(text: str) -> None:
    assert parse_ipv4_literal(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.1", IPv4Address("127.0.0.1")),
        ("0xa9fea9fe", METADATA),
        ("::1", IPv6Address("::1")),
        ("[::1]", IPv6Address("::1")),
        ("[::]", IPv6Address("::")),
        ("::ffff:127.0.0.1", IPv6Address("::ffff:7f00:1")),
        ("::ffff:a9fe:a9fe", IPv6Address("::ffff:169.254.169.254")),
        ("2001:db8::1", IPv6Address("2001:db8::1")),
    ],
)
def test_parse_ip_literal_accepts(text: str, expected: IPv4Address | IPv6Address) -> None:
    assert parse_ip_literal(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "example.test",
        "fe80::1%eth0",
        "[fe80::1%eth0]",
        "::ffff:127.1",
        "[::1",
        "1:2:3",
        "2001:db8::1:",
        "",
    ],
)
def test_parse_ip_literal_rejects(text: str) -> None:
    assert parse_ip_literal(text) is None
