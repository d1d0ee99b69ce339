"""Tests for the gateway settings: flags, environment, profiles and secret handling."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import Profile, load_settings
from services.api.settings import ApiSettings


def test_flag_sets_body_limit() -> None:
    settings = load_settings(ApiSettings, ["--max-request-body", "1MiB"])

    assert settings.max_request_body == 1024 * 1024


def test_environment_sets_body_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_MAX_REQUEST_BODY", "1MiB")

    settings = load_settings(ApiSettings, [])

    assert settings.max_request_body == 1024 * 1024


def test_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_LISTEN_PORT", "9000")

    settings = load_settings(ApiSettings, ["--listen-port", "9001"])

    assert settings.listen_port == 9001


def test_flag_sets_key_file() -> None:
    settings = load_settings(ApiSettings, ["--api-keys-file", "/etc/agent-runner/keys"])

    assert settings.api_keys_file == Path("/etc/agent-runner/keys")


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        pytest.param("profile", Profile.PRODUCTION, id="profile"),
        pytest.param("allow_http_image_urls", False, id="https-only"),
        pytest.param("listen_address", IPv4Address("127.0.0.1"), id="loopback"),
        pytest.param("api_keys_file", None, id="no-key-file"),
        pytest.param("api_keys", None, id="no-plain-keys"),
        pytest.param("max_request_body", 64 * 1024, id="control-body"),
        pytest.param("max_passthrough_body", 10 * 1024 * 1024, id="passthrough-body"),
    ],
)
def test_production_default(field: str, expected: Any) -> None:
    settings = load_settings(ApiSettings, [])

    assert getattr(settings, field) == expected


def test_development_relaxes_listed_settings() -> None:
    settings = load_settings(ApiSettings, ["--profile", "development"])

    assert settings.relaxed_settings() == {"allow_http_image_urls": True, "insecure_http": True}


def test_development_changes_nothing_else() -> None:
    production = load_settings(ApiSettings, [])
    development = load_settings(ApiSettings, ["--profile", "development"])

    changed = {
        name
        for name in ApiSettings.model_fields
        if getattr(production, name) != getattr(development, name)
    }

    assert changed == {"profile", *ApiSettings.development_defaults}


def test_development_warns_per_relaxed_setting(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(ApiSettings, ["--profile", "development"])

    with caplog.at_level(logging.WARNING, logger="libs.common.settings"):
        settings.warn_if_relaxed()

    settings_named = [record.__dict__["setting"] for record in caplog.records]
    assert settings_named == ["allow_http_image_urls", "insecure_http"]


def test_development_keeps_explicit_value() -> None:
    settings = load_settings(
        ApiSettings, ["--profile", "development", "--no-allow-http-image-urls"]
    )

    assert settings.allow_http_image_urls is False
    assert settings.relaxed_settings() == {"insecure_http": True}


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        pytest.param(["--listen-port", "0"], "--listen-port", id="port-zero"),
        pytest.param(["--listen-port", "65536"], "--listen-port", id="port-high"),
        pytest.param(["--listen-address", "::1"], "--listen-address", id="ipv6"),
        pytest.param(["--request-timeout", "-1"], "--request-timeout", id="timeout-negative"),
        pytest.param(["--max-request-body", "big"], "--max-request-body", id="body-text"),
        pytest.param(["--api-key", "k"], "--api-key", id="unknown-flag"),
    ],
)
def test_invalid_value_names_option(argv: list[str], option: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(ApiSettings, argv)

    assert option in str(error.value)


def test_redacted_hides_plain_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_API_KEYS", "first-secret,second-secret")

    redacted = load_settings(ApiSettings, []).redacted()

    assert redacted["api_keys"] == "<redacted>"
    assert "first-secret" not in str(redacted)
    assert "second-secret" not in str(redacted)


def test_redacted_keeps_key_file_path() -> None:
    redacted = load_settings(ApiSettings, ["--api-keys-file", "/etc/agent-runner/keys"]).redacted()

    assert redacted["api_keys_file"] == "/etc/agent-runner/keys"
