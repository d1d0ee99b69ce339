"""Tests for the proxy settings: secure defaults, domain lists and listen address checks."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.proxy.settings import ProxySettings


def test_defaults_deny_everything_and_keep_tls_unread() -> None:
    settings = load_settings(ProxySettings, [])

    assert settings.allowed_domains == []
    assert settings.blocked_domains == []
    assert settings.allow_ip_literals == []
    assert settings.allowed_ports == [80, 443]
    assert settings.tls_inspection is False
    assert settings.gateway_address == IPv4Address("172.30.0.1")
    assert (
        settings.proxy_transparent_port,
        settings.proxy_dns_port,
        settings.proxy_explicit_port,
    ) == (15001, 15053, 15080)


def test_domain_lists_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_BLOCKED_DOMAINS", '["bad.test"]')

    settings = load_settings(
        ProxySettings, ["--allowed-domains=a.test,*.b.test", "--upstream-dns=198.51.100.53"]
    )

    assert settings.allowed_domains == ["a.test", "*.b.test"]
    assert settings.blocked_domains == ["bad.test"]
    assert settings.upstream_dns == [IPv4Address("198.51.100.53")]


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        pytest.param("--allowed-domains=user@a.test", "user@a.test", id="userinfo"),
        pytest.param("--blocked-domains=a.test:80", "a.test:80", id="port"),
        pytest.param("--allowed-domains=127.0.0.1", "127.0.0.1", id="ip-literal"),
        pytest.param("--allowed-domains=*.", "*.", id="bare-wildcard"),
        pytest.param("--allow-ip-literals=fe80::1%eth0", "fe80::1%eth0", id="zone-id"),
    ],
)
def test_invalid_domain_setting_named(argument: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(ProxySettings, [argument])

    assert expected in str(error.value)


def test_ports_must_differ() -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(ProxySettings, ["--proxy-dns-port=15001"])

    assert "different ports" in str(error.value)


def test_allowed_ports_must_be_tcp_ports() -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(ProxySettings, ["--allowed-ports=443,70000"])

    assert "70000" in str(error.value)


def test_gateway_outside_subnet_rejected() -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(
            ProxySettings, ["--sandbox-subnet=172.29.0.0/24", "--sandbox-gateway=172.30.0.1"]
        )

    assert "172.30.0.1" in str(error.value)
    assert "172.29.0.0/24" in str(error.value)
