"""Tests for the --trusted-image-sources and --image-max-redirects settings of the supervisor."""

from __future__ import annotations

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.supervisor.settings import SupervisorSettings

DEVELOPMENT = ["--profile", "development"]
# The production profile also requires an image signer, which these tests do not configure.
PRODUCTION = ["--profile", "production", "--no-require-signed-images"]
SOURCES = "--trusted-image-sources"


def test_sources_default_empty_in_both_profiles() -> None:
    assert load_settings(SupervisorSettings, PRODUCTION).trusted_image_sources == []
    assert load_settings(SupervisorSettings, DEVELOPMENT).trusted_image_sources == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(
            [*PRODUCTION, SOURCES, "https://images.example.com/agents/"],
            ["https://images.example.com/agents/"],
            id="one",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://a.example.com/x/,https://b.example.com:8443/"],
            ["https://a.example.com/x/", "https://b.example.com:8443/"],
            id="comma-separated",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://a.example.com/", SOURCES, "https://b.example.com/"],
            ["https://a.example.com/", "https://b.example.com/"],
            id="repeated-flag",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "HTTPS://Images.Example.COM:443/%61gents/"],
            ["https://images.example.com/agents/"],
            id="canonical-form",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://a.example.com/,https://A.example.com:443/"],
            ["https://a.example.com/"],
            id="duplicates-dropped",
        ),
        pytest.param(
            [*DEVELOPMENT, SOURCES, "http://127.0.0.1:8080/"],
            ["http://127.0.0.1:8080/"],
            id="http-in-development",
        ),
        pytest.param(
            [*PRODUCTION, "--allow-http-image-urls", SOURCES, "http://0x7f.1:8080/"],
            ["http://127.0.0.1:8080/"],
            id="http-allowed-explicitly",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://[2001:db8::1]/images"],
            ["https://[2001:db8::1]/images"],
            id="ipv6-no-slash",
        ),
    ],
)
def test_sources_accepted(argv: list[str], expected: list[str]) -> None:
    assert load_settings(SupervisorSettings, argv).trusted_image_sources == expected


def test_sources_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AGENT_RUNNER_TRUSTED_IMAGE_SOURCES",
        '["https://a.example.com/agents/", "https://b.example.com/"]',
    )

    settings = load_settings(SupervisorSettings, PRODUCTION)

    assert settings.trusted_image_sources == [
        "https://a.example.com/agents/",
        "https://b.example.com/",
    ]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        pytest.param(
            [*PRODUCTION, SOURCES, "http://images.example.com/"],
            "entry 1 ('http://images.example.com/') has scheme 'http'",
            id="http-in-production",
        ),
        pytest.param(
            [*DEVELOPMENT, "--no-allow-http-image-urls", SOURCES, "http://127.0.0.1:8080/"],
            "use https://",
            id="http-without-allow-http",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://a.example.com/,ftp://b.example.com/"],
            "entry 2 ('ftp://b.example.com/') has scheme 'ftp'",
            id="ftp-second",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "images.example.com/agents/"],
            "has scheme ''",
            id="relative",
        ),
        pytest.param([*PRODUCTION, SOURCES, "https:///agents/"], "has no host", id="no-host"),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://images.example.com/agents/?v=1"],
            "query or fragment",
            id="query",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://images.example.com/agents/#top"],
            "query or fragment",
            id="fragment",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://user@images.example.com/"],
            "'https://***@images.example.com/') contains credentials",
            id="user",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://images.example.com:99999/"],
            "invalid port '99999'",
            id="port",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://images.example.com/a/../b/"],
            "'..' segment",
            id="dot-dot",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://images.example.com/a%2Fb/"],
            "escaped '/'",
            id="escaped-slash",
        ),
        pytest.param(
            [*PRODUCTION, SOURCES, "https://images_example.com/"],
            "invalid host 'images_example.com'",
            id="host",
        ),
    ],
)
def test_invalid_source_rejected(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(SupervisorSettings, argv)

    message = str(error.value)
    assert "--trusted-image-sources entry" in message
    assert named in message
    assert "such as https://images.example.com/agents/" in message


def test_invalid_source_hides_password() -> None:
    argv = [*PRODUCTION, SOURCES, "https://user:hunter2@images.example.com/"]

    with pytest.raises(ConfigurationError) as error:
        load_settings(SupervisorSettings, argv)

    assert "credentials" in str(error.value)
    assert "hunter2" not in str(error.value)


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("5", 5), ("20", 20)])
def test_max_redirects_accepted(value: str, expected: int) -> None:
    settings = load_settings(SupervisorSettings, [*PRODUCTION, "--image-max-redirects", value])

    assert settings.image_max_redirects == expected


@pytest.mark.parametrize("value", ["-1", "21", "x"])
def test_max_redirects_rejected(value: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(SupervisorSettings, [*PRODUCTION, "--image-max-redirects", value])

    assert "--image-max-redirects" in str(error.value)
