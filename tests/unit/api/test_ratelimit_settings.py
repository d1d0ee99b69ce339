"""The gateway's rate-limit and client-address settings: defaults, parsing and rejection."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.api.app import access_limits
from services.api.forwarded import ForwardedHeader
from services.api.settings import ApiSettings


def test_defaults() -> None:
    settings = load_settings(ApiSettings, [])

    assert settings.rate_limit == 20.0
    assert settings.rate_limit_burst == 100
    assert settings.global_rate_limit == 500.0
    assert settings.global_rate_limit_burst == 1000
    assert settings.auth_failure_rate_limit == 1.0
    assert settings.auth_failure_rate_limit_burst == 30
    assert settings.trusted_proxies == []
    assert settings.forwarded_header is ForwardedHeader.X_FORWARDED_FOR
    assert settings.rate_limit_key_prefix == "agent-runner:api:rate:"


def test_flags_set_bucket_sizes() -> None:
    settings = load_settings(
        ApiSettings,
        [
            "--rate-limit=2.5",
            "--rate-limit-burst=7",
            "--global-rate-limit=40",
            "--global-rate-limit-burst=80",
            "--auth-failure-rate-limit=0.1",
            "--auth-failure-rate-limit-burst=5",
        ],
    )

    limits = access_limits(settings)

    assert (limits.client.rate, limits.client.burst) == (2.5, 7)
    assert (limits.key.rate, limits.key.burst) == (2.5, 7)
    assert (limits.overall.rate, limits.overall.burst) == (40.0, 80)
    assert (limits.auth_failures.rate, limits.auth_failures.burst) == (0.1, 5)


def test_trusted_proxies_from_flag() -> None:
    settings = load_settings(
        ApiSettings,
        ["--trusted-proxies", "198.51.100.0/24,2001:db8::/32", "--forwarded-header", "forwarded"],
    )

    assert settings.trusted_proxies == [ip_network("198.51.100.0/24"), ip_network("2001:db8::/32")]
    assert settings.forwarded_header is ForwardedHeader.FORWARDED


def test_trusted_proxies_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_TRUSTED_PROXIES", '["198.51.100.7"]')

    settings = load_settings(ApiSettings, [])

    assert settings.trusted_proxies == [ip_network("198.51.100.7/32")]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        pytest.param(["--rate-limit=0"], "--rate-limit", id="zero-rate"),
        pytest.param(["--rate-limit=-1"], "--rate-limit", id="negative-rate"),
        pytest.param(["--rate-limit=nan"], "--rate-limit", id="nan-rate"),
        pytest.param(["--rate-limit-burst=0"], "--rate-limit-burst", id="zero-burst"),
        pytest.param(["--rate-limit-burst=1.5"], "--rate-limit-burst", id="fractional-burst"),
        pytest.param(["--global-rate-limit=0"], "--global-rate-limit", id="zero-global"),
        pytest.param(
            ["--auth-failure-rate-limit-burst=0"], "--auth-failure-rate-limit-burst", id="zero-auth"
        ),
        pytest.param(["--trusted-proxies=198.51.100.7/24"], "--trusted-proxies", id="host-bits"),
        pytest.param(["--trusted-proxies=proxy.test"], "--trusted-proxies", id="name"),
        pytest.param(["--forwarded-header=x-client-ip"], "--forwarded-header", id="header"),
        pytest.param(["--rate-limit-key-prefix=a b"], "--rate-limit-key-prefix", id="prefix-space"),
    ],
)
def test_invalid_value_rejected(argv: list[str], option: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(ApiSettings, argv)

    assert option in str(error.value)
