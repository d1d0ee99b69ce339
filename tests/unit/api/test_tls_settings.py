"""Tests for the gateway's TLS settings: pairs of options, profiles and the plain HTTP opt-in."""

from __future__ import annotations

import logging

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.api.settings import ApiSettings

TLS = [
    "--tls-cert",
    "/etc/agent-runner/tls/fullchain.pem",
    "--tls-key",
    "/etc/agent-runner/tls/privkey.pem",
]


def test_production_without_tls_rejected() -> None:
    settings = load_settings(ApiSettings, [])

    with pytest.raises(ConfigurationError) as error:
        settings.check_transport()

    assert "--tls-cert" in str(error.value)
    assert "--insecure-http" in str(error.value)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(TLS, id="tls"),
        pytest.param(["--insecure-http"], id="insecure-http"),
        pytest.param(["--profile", "development"], id="development"),
    ],
)
def test_transport_accepted(argv: list[str]) -> None:
    load_settings(ApiSettings, argv).check_transport()


def test_development_without_insecure_http_rejected() -> None:
    settings = load_settings(ApiSettings, ["--profile", "development", "--no-insecure-http"])

    with pytest.raises(ConfigurationError, match="--insecure-http"):
        settings.check_transport()


def test_development_relaxes_insecure_http() -> None:
    settings = load_settings(ApiSettings, ["--profile", "development"])

    assert settings.insecure_http is True
    assert settings.relaxed_settings()["insecure_http"] is True


def test_development_warning_names_insecure_http(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(ApiSettings, ["--profile", "development"])

    with caplog.at_level(logging.WARNING, logger="libs.common.settings"):
        settings.warn_if_relaxed()

    assert "insecure_http" in [record.__dict__["setting"] for record in caplog.records]


def test_certificate_serves_tls_in_development() -> None:
    settings = load_settings(ApiSettings, ["--profile", "development", *TLS])

    assert settings.serves_tls


def test_environment_sets_tls_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_TLS_CERT", "/tls/fullchain.pem")
    monkeypatch.setenv("AGENT_RUNNER_TLS_KEY", "/tls/privkey.pem")

    settings = load_settings(ApiSettings, [])

    assert str(settings.tls_cert) == "/tls/fullchain.pem"
    assert str(settings.tls_key) == "/tls/privkey.pem"


def test_redirect_settings_accepted() -> None:
    settings = load_settings(
        ApiSettings,
        [*TLS, "--http-redirect-port", "8081", "--public-host", "runner.example.com"],
    )

    assert settings.http_redirect_port == 8081
    assert settings.public_host == "runner.example.com"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(
            ["--tls-cert", "/tls/fullchain.pem"],
            "--tls-cert is set but --tls-key is not",
            id="cert-only",
        ),
        pytest.param(
            ["--tls-key", "/tls/privkey.pem"],
            "--tls-key is set but --tls-cert is not",
            id="key-only",
        ),
        pytest.param(
            ["--insecure-http", "--http-redirect-port", "8081", "--public-host", "a.example"],
            "--http-redirect-port redirects to HTTPS, which needs --tls-cert",
            id="redirect-without-tls",
        ),
        pytest.param(
            [*TLS, "--http-redirect-port", "8081"],
            "--http-redirect-port needs --public-host",
            id="redirect-without-public-host",
        ),
        pytest.param(
            [*TLS, "--http-redirect-port", "8080", "--public-host", "a.example"],
            "--http-redirect-port=8080 equals --listen-port",
            id="redirect-on-listen-port",
        ),
        pytest.param(["--http-redirect-port", "0"], "--http-redirect-port", id="port-zero"),
        pytest.param(["--public-port", "65536"], "--public-port", id="public-port-high"),
        pytest.param(["--public-host", "Runner.example"], "--public-host", id="upper-case"),
        pytest.param(["--public-host", "runner.example:443"], "--public-host", id="with-port"),
        pytest.param(["--public-host", "run_ner.example"], "--public-host", id="underscore"),
        pytest.param(["--public-host", "a..example"], "--public-host", id="empty-label"),
        pytest.param(["--public-host", "evil.example/x"], "--public-host", id="with-path"),
        pytest.param(["--tls-check-interval", "0"], "--tls-check-interval", id="interval-zero"),
    ],
)
def test_invalid_tls_setting_names_option(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(ApiSettings, argv)

    assert expected in str(error.value)
