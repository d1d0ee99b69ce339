"""Tests for the metrics settings of the gateway: key length, bind address and key reuse."""

from __future__ import annotations

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.api.app import metrics_key_on_gateway_port
from services.api.auth import KeyRing
from services.api.metrics import check_metrics_key
from services.api.settings import ApiSettings

LONG_KEY = "m" * 40


def test_short_metrics_key_rejected() -> None:
    with pytest.raises(ConfigurationError, match="at least 32"):
        load_settings(ApiSettings, ["--metrics-api-key", "short"])


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("0.0.0.0:9466", "not an internal address"),
        ("100.64.0.7:9466", "not an internal address"),
        ("127.0.0.1:8080", "port of another gateway listener"),
        ("127.0.0.1:70000", "no valid port"),
        ("localhost:9466", "metrics-bind"),
    ],
)
def test_invalid_metrics_bind_rejected(bind: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_settings(ApiSettings, ["--metrics-bind", bind])


def test_metrics_bind_accepted() -> None:
    settings = load_settings(ApiSettings, ["--metrics-bind", "10.0.0.5:9466"])

    assert str(settings.metrics_address_port[0]) == "10.0.0.5"
    assert settings.metrics_address_port[1] == 9466


def test_metrics_key_hidden_in_redacted_settings() -> None:
    settings = load_settings(ApiSettings, ["--metrics-api-key", LONG_KEY])

    assert settings.redacted()["metrics_api_key"] == "<redacted>"
    assert LONG_KEY not in repr(settings)


def test_bind_moves_metrics_off_gateway_port() -> None:
    keyed = load_settings(ApiSettings, ["--metrics-api-key", LONG_KEY])
    both = load_settings(
        ApiSettings, ["--metrics-api-key", LONG_KEY, "--metrics-bind", "127.0.0.1:9466"]
    )

    assert metrics_key_on_gateway_port(keyed) is not None
    assert metrics_key_on_gateway_port(both) is None
    assert metrics_key_on_gateway_port(load_settings(ApiSettings, [])) is None


def test_metrics_key_equal_to_api_key_rejected() -> None:
    keyring = KeyRing.load(key_file=None, plain_keys=f"other,{LONG_KEY}")

    with pytest.raises(ConfigurationError, match="equals one of the API keys"):
        check_metrics_key(LONG_KEY, keyring)
    check_metrics_key("n" * 40, keyring)
    check_metrics_key(None, keyring)
