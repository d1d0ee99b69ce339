"""Tests for image URL canonical form, trusted source matching and the address checks."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.image_sources import (
    TrustedSource,
    UrlInvalid,
    check_addresses,
    parse_image_url,
    parse_trusted_source,
    parse_url,
    trusted_source_for,
)

AGENTS = "https://images.example.com/agents/"


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        pytest.param(
            "https://Images.Example.COM/agents/a.tar",
            "https://images.example.com/agents/a.tar",
            id="host-case",
        ),
        pytest.param(
            "HTTPS://images.example.com/agents/a.tar",
            "https://images.example.com/agents/a.tar",
            id="scheme-case",
        ),
        pytest.param(
            "https://images.example.com:443/a.tar", "https://images.example.com/a.tar", id="port"
        ),
        pytest.param(
            "https://images.example.com:8443/a.tar",
            "https://images.example.com:8443/a.tar",
            id="other-port",
        ),
        pytest.param(
            "https://images.example.com./a.tar", "https://images.example.com/a.tar", id="dot"
        ),
        pytest.param("https://images.example.com", "https://images.example.com/", id="no-path"),
        pytest.param(
            "https://images.example.com/%61gents/%7e/a%2d1.tar",
            "https://images.example.com/agents/~/a-1.tar",
            id="unreserved-decoded",
        ),
        pytest.param(
            "https://images.example.com/a%2cb%3A.tar",
            "https://images.example.com/a%2Cb%3A.tar",
            id="reserved-upper-case",
        ),
        pytest.param(
            "https://images.example.com/bild-ä.tar",
            "https://images.example.com/bild-%C3%A4.tar",
            id="non-ascii-path",
        ),
        pytest.param(
            "https://images.example.com/a%22b.tar",
            "https://images.example.com/a%22b.tar",
            id="escaped-quote",
        ),
        pytest.param(
            'https://images.example.com/a"b.tar',
            "https://images.example.com/a%22b.tar",
            id="raw-quote",
        ),
        pytest.param("https://bücher.example/a", "https://xn--bcher-kva.example/a", id="idna"),
        pytest.param("http://0x7f.1:8080/a", "http://127.0.0.1:8080/a", id="hex-ipv4"),
        pytest.param("http://2130706433/a", "http://127.0.0.1/a", id="integer-ipv4"),
        pytest.param("http://[0:0::1]:8080/a", "http://[::1]:8080/a", id="ipv6"),
        pytest.param(
            "https://images.example.com/a.tar?sig=abc&x=ü",
            "https://images.example.com/a.tar?sig=abc&x=%C3%BC",
            id="query",
        ),
        pytest.param(
            "https://images.example.com/a.tar#part", "https://images.example.com/a.tar", id="frag"
        ),
    ],
)
def test_url_canonical_form(url: str, canonical: str) -> None:
    assert parse_url(url, allow_http=True).text == canonical


@pytest.mark.parametrize(
    ("url", "named"),
    [
        pytest.param("ftp://images.example.com/a.tar", "'ftp'", id="ftp"),
        pytest.param("file:///var/lib/a.tar", "'file'", id="file"),
        pytest.param("images.example.com/a.tar", "scheme ''", id="relative"),
        pytest.param("", "scheme ''", id="empty"),
        pytest.param("https:///a.tar", "no host", id="no-host"),
        pytest.param("https://user@images.example.com/a.tar", "credentials", id="user"),
        pytest.param("https://u:pw@images.example.com/a.tar", "credentials", id="password"),
        pytest.param("https://@images.example.com/a.tar", "credentials", id="empty-userinfo"),
        pytest.param("https://evil.test\\@images.example.com/", "credentials", id="backslash-at"),
        pytest.param("https://images.example.com:0/a.tar", "'0'", id="port-zero"),
        pytest.param("https://images.example.com:65536/a.tar", "'65536'", id="port-too-large"),
        pytest.param("https://images.example.com:/a.tar", "''", id="port-empty"),
        pytest.param("https://images.example.com:x/a.tar", "'x'", id="port-letters"),
        pytest.param("https://images_example.com/a.tar", "invalid host", id="underscore"),
        pytest.param("https://::1/a.tar", "brackets", id="ipv6-unbracketed"),
        pytest.param("https://[::1/a.tar", "cannot be parsed", id="ipv6-open-bracket"),
        pytest.param("https://[::1]x/a.tar", "cannot be parsed", id="ipv6-trailing-text"),
        pytest.param("https://[fe80::1%25eth0]/a.tar", "invalid host", id="ipv6-zone"),
        pytest.param("https://images.example.com/a/../b.tar", "'..'", id="dot-dot"),
        pytest.param("https://images.example.com/a/./b.tar", "'.'", id="dot"),
        pytest.param("https://images.example.com/a/..", "'..'", id="dot-dot-last"),
        pytest.param("https://images.example.com/a/%2e%2E/b.tar", "'..'", id="escaped-dots"),
        pytest.param("https://images.example.com/a/.%2e/b.tar", "'..'", id="half-escaped-dots"),
        pytest.param("https://images.example.com/a/..;x/b.tar", "'..;x'", id="dot-dot-params"),
        pytest.param("https://images.example.com/a%2Fb.tar", "'%2F'", id="escaped-slash"),
        pytest.param("https://images.example.com/a%2f..%2fb", "'%2f'", id="escaped-slash-lower"),
        pytest.param("https://images.example.com/a%5Cb.tar", "'%5C'", id="escaped-backslash"),
        pytest.param("https://images.example.com/a%252e.tar", "'%25'", id="double-escape"),
        pytest.param("https://images.example.com/a%00.tar", "control", id="escaped-nul"),
        pytest.param("https://images.example.com/a%zz.tar", "'%zz'", id="invalid-escape"),
        pytest.param("https://images.example.com/a%4", "'%4'", id="short-escape"),
        pytest.param("https://images.example.com/a\\b.tar", "backslash", id="backslash"),
        pytest.param("https://images.example.com/a b.tar", "space", id="space"),
        pytest.param("https://images.example.com/a\tb.tar", "control", id="tab"),
        pytest.param("https://images.example.com/a.tar\n", "control", id="newline"),
        pytest.param("https://images.example.com/\ud800.tar", "Unicode", id="surrogate"),
    ],
)
def test_url_rejected(url: str, named: str) -> None:
    with pytest.raises(UrlInvalid) as error:
        parse_url(url, allow_http=True)

    assert named in str(error.value)


def test_http_rejected_unless_allowed() -> None:
    with pytest.raises(UrlInvalid) as error:
        parse_url("http://images.example.com/a.tar", allow_http=False)

    assert "development profile" in error.value.fix


def test_image_url_problem_is_url_not_allowed() -> None:
    with pytest.raises(ImageRejected) as error:
        parse_image_url("https://u:hunter2@images.example.com/a.tar", allow_http=False)

    assert error.value.reason == FailureReason.URL_NOT_ALLOWED
    assert "credentials" in error.value.message
    assert "hunter2" not in str(error.value)


def test_display_hides_query() -> None:
    url = parse_url("https://images.example.com/a.tar?token=secret", allow_http=False)

    assert url.display == "https://images.example.com/a.tar?…"
    assert url.target == "/a.tar?token=secret"


@pytest.mark.parametrize(
    ("source", "url", "contained"),
    [
        pytest.param(AGENTS, f"{AGENTS}a.tar", True, id="file-under-prefix"),
        pytest.param(AGENTS, f"{AGENTS}team/a.tar", True, id="deeper"),
        pytest.param(AGENTS, "https://images.example.com/agents-evil/a.tar", False, id="sibling"),
        pytest.param(AGENTS, "https://images.example.com/agents", False, id="prefix-itself"),
        pytest.param(AGENTS, "https://images.example.com/a.tar", False, id="parent"),
        pytest.param(AGENTS, "https://images.example.com/AGENTS/a.tar", False, id="path-case"),
        pytest.param(AGENTS, "https://IMAGES.example.com/agents/a.tar", True, id="host-case"),
        pytest.param(AGENTS, "https://images.example.com:443/agents/a.tar", True, id="port-443"),
        pytest.param(AGENTS, "https://images.example.com:8443/agents/a.tar", False, id="port"),
        pytest.param(AGENTS, "http://images.example.com/agents/a.tar", False, id="scheme"),
        pytest.param(AGENTS, "https://images.example.com/%61gents/a.tar", True, id="escaped"),
        pytest.param(AGENTS, "https://images.example.com/agents%2Da.tar", False, id="esc-dash"),
        pytest.param(AGENTS, "https://images.example.com.evil.test/agents/a", False, id="suffix"),
        pytest.param(AGENTS, "https://evil.test/agents/a.tar", False, id="other-host"),
        pytest.param(AGENTS, "https://sub.images.example.com/agents/a", False, id="subdomain"),
        pytest.param(AGENTS, "https://images.example.com/agents//a.tar", True, id="empty-segment"),
        pytest.param(
            "https://images.example.com/agents",
            "https://images.example.com/agents/a.tar",
            True,
            id="no-slash-deeper",
        ),
        pytest.param(
            "https://images.example.com/agents",
            "https://images.example.com/agents",
            True,
            id="no-slash-itself",
        ),
        pytest.param(
            "https://images.example.com/agents",
            "https://images.example.com/agents-evil/a.tar",
            False,
            id="no-slash-sibling",
        ),
        pytest.param(
            "https://images.example.com/agents/a.tar",
            "https://images.example.com/agents/a.tar.evil",
            False,
            id="file-source-longer-name",
        ),
        pytest.param(
            "https://images.example.com", "https://images.example.com/x/y.tar", True, id="root"
        ),
        pytest.param(
            "http://127.0.0.1:8080/", "http://0x7f.1:8080/a.tar", True, id="ipv4-spelling"
        ),
        pytest.param("http://127.0.0.1:8080/", "http://127.0.0.2:8080/a", False, id="ipv4-other"),
        pytest.param("http://127.0.0.1:8080/", "http://localhost:8080/a", False, id="name"),
        pytest.param(
            "https://[2001:db8::1]/x/", "https://[2001:db8:0::1]/x/a", True, id="ipv6-spelling"
        ),
    ],
)
def test_source_contains(source: str, url: str, contained: bool) -> None:
    trusted = parse_trusted_source(source, allow_http=True)

    assert trusted.contains(parse_url(url, allow_http=True)) is contained


@pytest.mark.parametrize(
    ("source", "canonical"),
    [
        pytest.param(AGENTS, AGENTS, id="unchanged"),
        pytest.param("HTTPS://Images.Example.com:443/agents/", AGENTS, id="case-and-port"),
        pytest.param("https://images.example.com", "https://images.example.com/", id="no-path"),
        pytest.param("http://0x7f.1:8080/a/", "http://127.0.0.1:8080/a/", id="ipv4-spelling"),
        pytest.param("https://[::1]:8443/", "https://[::1]:8443/", id="ipv6"),
    ],
)
def test_source_canonical_form(source: str, canonical: str) -> None:
    assert parse_trusted_source(source, allow_http=True).url == canonical


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(f"{AGENTS}?x=1", id="query"),
        pytest.param(f"{AGENTS}?", id="empty-query"),
        pytest.param(f"{AGENTS}#x", id="fragment"),
    ],
)
def test_source_with_query_or_fragment_rejected(source: str) -> None:
    with pytest.raises(UrlInvalid) as error:
        parse_trusted_source(source, allow_http=False)

    assert "query or fragment" in error.value.problem


def test_source_ip_literal_sets_address() -> None:
    assert parse_trusted_source("http://127.0.0.1:8080/", allow_http=True).address == (
        IPv4Address("127.0.0.1")
    )
    assert parse_trusted_source(AGENTS, allow_http=False).address is None


def sources(*urls: str) -> tuple[TrustedSource, ...]:
    return tuple(parse_trusted_source(url, allow_http=True) for url in urls)


def test_no_sources_trust_every_url() -> None:
    assert trusted_source_for(parse_url("https://evil.test/a", allow_http=False), ()) is None


def test_matching_source_returned() -> None:
    configured = sources("https://other.test/", AGENTS)

    found = trusted_source_for(parse_url(f"{AGENTS}a.tar", allow_http=False), configured)

    assert found == configured[1]


def test_untrusted_url_names_origin_and_sources() -> None:
    url = parse_url("https://evil.test:8443/agents/a.tar?token=secret", allow_http=False)

    with pytest.raises(ImageRejected) as error:
        trusted_source_for(url, sources(AGENTS, "http://127.0.0.1:8080/"))

    assert error.value.reason == FailureReason.SOURCE_NOT_TRUSTED
    assert "origin https://evil.test:8443" in error.value.message
    assert f"{AGENTS}, http://127.0.0.1:8080/" in error.value.message
    assert "secret" not in error.value.message


PUBLIC = ip_address("203.0.113.10")


@pytest.mark.parametrize(
    ("addresses", "detail"),
    [
        pytest.param([ip_address("127.0.0.1")], "address_loopback", id="loopback"),
        pytest.param([ip_address("::1")], "address_loopback", id="loopback-v6"),
        pytest.param([ip_address("10.1.2.3")], "address_private", id="private"),
        pytest.param([ip_address("169.254.42.42")], "address_link_local", id="link-local"),
        pytest.param([ip_address("100.64.0.1")], "address_shared", id="shared"),
        pytest.param([ip_address("0.0.0.0")], "address_unspecified", id="unspecified"),
        pytest.param([ip_address("fd00::1")], "address_unique_local", id="unique-local"),
        pytest.param([ip_address("::ffff:127.0.0.1")], "address_embedded_ipv4", id="mapped"),
        pytest.param([PUBLIC, ip_address("192.168.1.1")], "192.168.1.1", id="any-denied"),
    ],
)
def test_internal_address_denied(addresses: list[IPv4Address | IPv6Address], detail: str) -> None:
    url = parse_url("https://images.example.com/a.tar", allow_http=False)

    with pytest.raises(ImageRejected) as error:
        check_addresses(url, addresses, source=None)

    assert error.value.reason == FailureReason.SOURCE_ADDRESS_DENIED
    assert detail in error.value.message
    assert "resolves to" in error.value.message


def test_public_addresses_allowed() -> None:
    url = parse_url("https://images.example.com/a.tar", allow_http=False)

    check_addresses(url, [PUBLIC, ip_address("2001:db8::10")], source=None)


def test_source_naming_address_allows_it() -> None:
    url = parse_url("http://127.0.0.1:8080/a.tar", allow_http=True)
    (source,) = sources("http://127.0.0.1:8080/")

    check_addresses(url, [ip_address("127.0.0.1")], source=source)


def test_named_source_exempts_only_its_address() -> None:
    url = parse_url("http://127.0.0.1:8080/a.tar", allow_http=True)
    (source,) = sources("http://127.0.0.1:8080/")

    with pytest.raises(ImageRejected) as error:
        check_addresses(url, [ip_address("127.0.0.1"), ip_address("10.0.0.1")], source=source)

    assert error.value.reason == FailureReason.SOURCE_ADDRESS_DENIED
    assert "10.0.0.1" in error.value.message


def test_name_source_exempts_nothing() -> None:
    url = parse_url("http://localhost:8080/a.tar", allow_http=True)
    (source,) = sources("http://localhost:8080/")

    with pytest.raises(ImageRejected) as error:
        check_addresses(url, [ip_address("127.0.0.1")], source=source)

    assert error.value.reason == FailureReason.SOURCE_ADDRESS_DENIED
    assert "http://127.0.0.1:8080/" in error.value.message


def test_ip_literal_denial_names_fix() -> None:
    url = parse_url("http://127.0.0.1:8080/a.tar", allow_http=True)

    with pytest.raises(ImageRejected) as error:
        check_addresses(url, [ip_address("127.0.0.1")], source=None)

    assert error.value.message.startswith("image URL host 127.0.0.1 is denied as address_loopback")
    assert "such as http://127.0.0.1:8080/, to --trusted-image-sources" in error.value.message


def test_no_addresses_fail_download() -> None:
    url = parse_url("https://images.example.com/a.tar", allow_http=False)

    with pytest.raises(ImageRejected) as error:
        check_addresses(url, [], source=None)

    assert error.value.reason == FailureReason.DOWNLOAD_FAILED
