"""Tests for the supervisor's image-cache and metrics settings."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.supervisor.settings import SupervisorSettings

GIB = 1024**3
MIB = 1024**2


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        pytest.param("cache_max_size", 10 * GIB, id="max-size"),
        pytest.param("cache_max_age", 7 * 24 * 3600, id="max-age"),
        pytest.param("cache_eviction_interval", 300.0, id="interval"),
        pytest.param("metrics_address", IPv4Address("127.0.0.1"), id="metrics-loopback"),
        pytest.param("metrics_port", 9465, id="metrics-port"),
    ],
)
def test_cache_default(field: str, expected: Any) -> None:
    settings = load_settings(SupervisorSettings, [])

    assert getattr(settings, field) == expected


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        pytest.param(["--cache-max-size", "3MiB"], "cache_max_size", 3 * MIB, id="size-suffix"),
        pytest.param(["--cache-max-size", "1000"], "cache_max_size", 1000, id="size-bytes"),
        pytest.param(["--cache-max-size", "0"], "cache_max_size", 0, id="size-zero"),
        pytest.param(["--cache-max-age", "2"], "cache_max_age", 2, id="age"),
        pytest.param(
            ["--cache-eviction-interval", "0.5"], "cache_eviction_interval", 0.5, id="interval"
        ),
        pytest.param(["--metrics-port", "0"], "metrics_port", 0, id="metrics-off"),
    ],
)
def test_cache_flag_sets_value(argv: list[str], field: str, expected: Any) -> None:
    settings = load_settings(SupervisorSettings, argv)

    assert getattr(settings, field) == expected


def test_cache_environment_sets_max_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_CACHE_MAX_SIZE", "2GiB")

    settings = load_settings(SupervisorSettings, [])

    assert settings.cache_max_size == 2 * GIB


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        pytest.param(["--cache-max-size", "-1"], "--cache-max-size", id="negative-size"),
        pytest.param(["--cache-max-size", "lots"], "--cache-max-size", id="size-not-a-size"),
        pytest.param(["--cache-max-age", "0"], "--cache-max-age", id="zero-age"),
        pytest.param(["--cache-max-age", "31536001"], "--cache-max-age", id="age-over-a-year"),
        pytest.param(
            ["--cache-eviction-interval", "0"], "--cache-eviction-interval", id="zero-interval"
        ),
        pytest.param(["--metrics-port", "65536"], "--metrics-port", id="port-too-high"),
        pytest.param(["--metrics-address", "localhost"], "--metrics-address", id="not-an-address"),
    ],
)
def test_cache_setting_rejected(argv: list[str], option: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(SupervisorSettings, argv)

    assert option in str(error.value)
