"""Tests for the netguard settings: the unsafe switch, the sandbox network and proxy ports."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.netguard.settings import NetguardSettings


def test_defaults() -> None:
    settings = load_settings(NetguardSettings, [])

    assert settings.disable_firewall is False
    assert settings.firewall_table == "agent_runner"
    assert settings.sandbox_subnet == IPv4Network("172.30.0.0/16")
    assert settings.sandbox_bridge == "ar-sandbox0"
    assert settings.proxy_transparent_port == 15001
    assert settings.proxy_dns_port == 15053
    assert settings.proxy_explicit_port == 15080
    assert settings.firewall_check_interval == 5.0


def test_disable_firewall_rejected_in_production() -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(NetguardSettings, ["--disable-firewall"])

    assert "--disable-firewall" in str(error.value)
    assert "production" in str(error.value)


def test_disable_firewall_environment_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENT_RUNNER_DISABLE_FIREWALL", "true")

    with pytest.raises(ConfigurationError) as error:
        load_settings(NetguardSettings, [])

    assert "--disable-firewall" in str(error.value)


def test_disable_firewall_accepted_in_development() -> None:
    settings = load_settings(NetguardSettings, ["--profile", "development", "--disable-firewall"])

    assert settings.disable_firewall is True


def test_development_keeps_firewall_by_default() -> None:
    settings = load_settings(NetguardSettings, ["--profile", "development"])

    assert settings.disable_firewall is False


def test_default_gateway_is_first_host() -> None:
    settings = load_settings(NetguardSettings, ["--sandbox-subnet", "10.20.30.0/24"])

    assert settings.sandbox_gateway is None
    assert settings.gateway_address == IPv4Address("10.20.30.1")


def test_explicit_gateway_used() -> None:
    settings = load_settings(
        NetguardSettings,
        ["--sandbox-subnet", "10.20.30.0/24", "--sandbox-gateway", "10.20.30.254"],
    )

    assert settings.gateway_address == IPv4Address("10.20.30.254")


@pytest.mark.parametrize(
    "gateway",
    [
        pytest.param("10.20.31.1", id="next-subnet"),
        pytest.param("172.30.0.1", id="default-subnet"),
        pytest.param("127.0.0.1", id="loopback"),
    ],
)
def test_gateway_outside_subnet_rejected(gateway: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(
            NetguardSettings, ["--sandbox-subnet", "10.20.30.0/24", "--sandbox-gateway", gateway]
        )

    assert f"--sandbox-gateway {gateway}" in str(error.value)
    assert "10.20.30.0/24" in str(error.value)


@pytest.mark.parametrize(
    "ports",
    [
        pytest.param(["--proxy-transparent-port", "15053"], id="transparent-is-dns"),
        pytest.param(["--proxy-explicit-port", "15001"], id="explicit-is-transparent"),
        pytest.param(["--proxy-dns-port", "15080"], id="dns-is-explicit"),
        pytest.param(
            [
                "--proxy-transparent-port",
                "9",
                "--proxy-dns-port",
                "9",
                "--proxy-explicit-port",
                "9",
            ],
            id="all-equal",
        ),
    ],
)
def test_duplicate_proxy_ports_rejected(ports: list[str]) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(NetguardSettings, ports)

    assert "--proxy-*-port" in str(error.value)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        pytest.param(["--firewall-table", "Agent_Runner"], "--firewall-table", id="table-upper"),
        pytest.param(["--firewall-table", "1table"], "--firewall-table", id="table-digit-first"),
        pytest.param(["--firewall-table", "t" * 33], "--firewall-table", id="table-long"),
        pytest.param(["--firewall-table", "a;b"], "--firewall-table", id="table-semicolon"),
        pytest.param(["--sandbox-bridge", "b" * 16], "--sandbox-bridge", id="bridge-long"),
        pytest.param(["--sandbox-bridge", "br 0"], "--sandbox-bridge", id="bridge-space"),
        pytest.param(["--sandbox-subnet", "10.0.0.1/24"], "--sandbox-subnet", id="host-bits"),
        pytest.param(["--sandbox-subnet", "fd00::/64"], "--sandbox-subnet", id="ipv6-subnet"),
        pytest.param(["--sandbox-gateway", "gateway"], "--sandbox-gateway", id="gateway-name"),
        pytest.param(["--proxy-dns-port", "0"], "--proxy-dns-port", id="port-zero"),
        pytest.param(["--proxy-dns-port", "65536"], "--proxy-dns-port", id="port-high"),
        pytest.param(
            ["--firewall-check-interval", "0"], "--firewall-check-interval", id="interval-zero"
        ),
        pytest.param(
            ["--firewall-check-interval", "301"], "--firewall-check-interval", id="interval-high"
        ),
    ],
)
def test_invalid_value_names_option(argv: list[str], option: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(NetguardSettings, argv)

    assert option in str(error.value)
