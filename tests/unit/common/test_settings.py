"""Tests for the settings shared by every service, loaded through `load_settings`."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import SecretStr

from libs.common.errors import ConfigurationError
from libs.common.settings import CommonSettings, Profile, load_settings


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        pytest.param(
            ["--nats-url", "tls://127.0.0.1:4223"],
            "nats_url",
            "tls://127.0.0.1:4223",
            id="nats-url",
        ),
        pytest.param(["--nats-timeout", "2.5"], "nats_timeout", 2.5, id="nats-timeout"),
        pytest.param(["--log-level", "DEBUG"], "log_level", "DEBUG", id="log-level"),
        pytest.param(["--host-id", "host-7.a_b"], "host_id", "host-7.a_b", id="host-id"),
        pytest.param(
            ["--redis-url", "rediss://10.0.0.5:6380/2"],
            "redis_url",
            "rediss://10.0.0.5:6380/2",
            id="redis-url",
        ),
        pytest.param(["--nats-user=runner"], "nats_user", "runner", id="equals-form"),
        pytest.param(["--profile", "development"], "profile", Profile.DEVELOPMENT, id="profile"),
    ],
)
def test_flag_sets_value(argv: list[str], field: str, expected: Any) -> None:
    settings = load_settings(CommonSettings, argv)

    assert getattr(settings, field) == expected


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        pytest.param(
            "AGENT_RUNNER_NATS_URL",
            "tls://127.0.0.1:4223",
            "nats_url",
            "tls://127.0.0.1:4223",
            id="nats-url",
        ),
        pytest.param("AGENT_RUNNER_NATS_TIMEOUT", "2.5", "nats_timeout", 2.5, id="nats-timeout"),
        pytest.param("AGENT_RUNNER_LOG_LEVEL", "ERROR", "log_level", "ERROR", id="log-level"),
        pytest.param("AGENT_RUNNER_HOST_ID", "host-8", "host_id", "host-8", id="host-id"),
        pytest.param(
            "AGENT_RUNNER_PROFILE", "development", "profile", Profile.DEVELOPMENT, id="profile"
        ),
    ],
)
def test_environment_sets_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: Any
) -> None:
    monkeypatch.setenv(variable, value)

    settings = load_settings(CommonSettings, [])

    assert getattr(settings, field) == expected


def test_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_NATS_TIMEOUT", "9")

    settings = load_settings(CommonSettings, ["--nats-timeout", "3"])

    assert settings.nats_timeout == 3.0


def test_production_is_default_profile() -> None:
    settings = load_settings(CommonSettings, [])

    assert settings.profile == Profile.PRODUCTION
    assert settings.relaxed_settings() == {}


def test_development_relaxes_nothing_shared(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(CommonSettings, ["--profile", "development"])

    with caplog.at_level(logging.WARNING):
        settings.warn_if_relaxed()

    assert settings.relaxed_settings() == {}
    assert caplog.records == []


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        pytest.param(["--bogus-flag", "1"], "--bogus-flag", id="unknown-flag"),
        pytest.param(["--nats_url", "nats://127.0.0.1:4222"], "--nats_url", id="snake-case-flag"),
        pytest.param(["stray"], "stray", id="positional"),
        pytest.param(["--nats-url"], "--nats-url", id="flag-without-value"),
    ],
)
def test_bad_command_line_rejected(argv: list[str], option: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(CommonSettings, argv)

    assert option in str(error.value)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        pytest.param(["--host-id", "bad host"], "--host-id", id="host-id-space"),
        pytest.param(["--host-id=-leading-dash"], "--host-id", id="host-id-dash"),
        pytest.param(["--host-id", "h" * 64], "--host-id", id="host-id-long"),
        pytest.param(["--host-id", "a.b>"], "--host-id", id="host-id-wildcard"),
        pytest.param(["--profile", "staging"], "--profile", id="profile"),
        pytest.param(["--log-level", "TRACE"], "--log-level", id="log-level"),
        pytest.param(["--nats-url", "http://127.0.0.1:4222"], "--nats-url", id="nats-scheme"),
        pytest.param(["--nats-timeout", "0"], "--nats-timeout", id="nats-timeout-zero"),
        pytest.param(["--nats-timeout", "121"], "--nats-timeout", id="nats-timeout-high"),
        pytest.param(["--redis-url", "http://127.0.0.1:6379"], "--redis-url", id="redis-scheme"),
        pytest.param(
            ["--redis-url", "redis://:pw@127.0.0.1:6379/0"], "--redis-url", id="redis-password"
        ),
        pytest.param(
            ["--redis-url", "redis://user:pw@127.0.0.1:6379/0"], "--redis-url", id="redis-user"
        ),
    ],
)
def test_invalid_value_names_option(argv: list[str], option: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(CommonSettings, argv)

    assert option in str(error.value)


def test_invalid_environment_value_names_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_NATS_TIMEOUT", "soon")

    with pytest.raises(ConfigurationError) as error:
        load_settings(CommonSettings, [])

    assert "--nats-timeout" in str(error.value)


def test_redis_url_error_hides_secrets() -> None:
    argv = [
        "--redis-url",
        "redis://:url-secret@127.0.0.1:6379/0",
        "--redis-password",
        "flag-secret",
        "--nats-password",
        "nats-secret",
    ]

    with pytest.raises(ConfigurationError) as error:
        load_settings(CommonSettings, argv)

    assert "url-secret" not in str(error.value)
    assert "flag-secret" not in str(error.value)
    assert "nats-secret" not in str(error.value)


def test_secrets_are_secret_strings() -> None:
    settings = load_settings(
        CommonSettings, ["--nats-password", "nats-secret", "--redis-password", "redis-secret"]
    )

    assert isinstance(settings.nats_password, SecretStr)
    assert isinstance(settings.redis_password, SecretStr)
    assert "redis-secret" not in repr(settings)


def test_redacted_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_REDIS_PASSWORD", "redis-secret")

    redacted = load_settings(CommonSettings, ["--nats-password", "nats-secret"]).redacted()

    assert redacted["nats_password"] == "<redacted>"
    assert redacted["redis_password"] == "<redacted>"
    assert "nats-secret" not in str(redacted)
    assert "redis-secret" not in str(redacted)


def test_redacted_keeps_other_values() -> None:
    redacted = load_settings(CommonSettings, ["--nats-user", "runner"]).redacted()

    assert redacted["nats_user"] == "runner"
    assert redacted["nats_password"] is None
    assert redacted["profile"] == "production"


def test_redacted_marks_empty_secret_empty() -> None:
    redacted = load_settings(CommonSettings, ["--redis-password", ""]).redacted()

    assert redacted["redis_password"] == ""
