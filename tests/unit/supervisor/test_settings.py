"""Tests for the supervisor settings: flags, environment, profiles and cross-field checks."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import Profile, load_settings
from services.supervisor.main import load_signature_policy
from services.supervisor.settings import SupervisorSettings
from tests.support.signing import make_ecdsa_key, make_ed25519_key, write_public_key

GIB = 1024**3
MIB = 1024**2


def test_flag_sets_memory_limit() -> None:
    settings = load_settings(SupervisorSettings, ["--container-memory-limit", "1GiB"])

    assert settings.container_memory_limit == GIB


def test_environment_sets_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_CONTAINER_MEMORY_LIMIT", "1GiB")

    settings = load_settings(SupervisorSettings, [])

    assert settings.container_memory_limit == GIB


def test_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_CONTAINER_MEMORY_LIMIT", "1GiB")

    settings = load_settings(SupervisorSettings, ["--container-memory-limit", "2GiB"])

    assert settings.container_memory_limit == 2 * GIB


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        pytest.param(
            ["--container-memory-limit", "1073741824"],
            "container_memory_limit",
            GIB,
            id="plain-bytes",
        ),
        pytest.param(
            ["--container-memory-limit", "1GB"],
            "container_memory_limit",
            10**9,
            id="decimal-suffix",
        ),
        pytest.param(["--container-cpu-limit", "0.5"], "container_cpu_limit", 0.5, id="cpu"),
        pytest.param(["--container-pids-limit", "64"], "container_pids_limit", 64, id="pids"),
        pytest.param(
            ["--bind-address", "127.0.0.2"],
            "bind_address",
            IPv4Address("127.0.0.2"),
            id="bind-address",
        ),
        pytest.param(
            ["--sandbox-subnet", "10.99.0.0/28"],
            "sandbox_subnet",
            IPv4Network("10.99.0.0/28"),
            id="subnet-28",
        ),
        pytest.param(["--runtime", "runsc"], "runtime", "runsc", id="runtime"),
        pytest.param(
            ["--allow-http-image-urls"], "allow_http_image_urls", True, id="implicit-flag"
        ),
    ],
)
def test_flag_sets_value(argv: list[str], field: str, expected: Any) -> None:
    settings = load_settings(SupervisorSettings, argv)

    assert getattr(settings, field) == expected


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        pytest.param("profile", Profile.PRODUCTION, id="profile"),
        pytest.param("allow_http_image_urls", False, id="https-only"),
        pytest.param("bind_address", IPv4Address("127.0.0.1"), id="loopback-ports"),
        pytest.param("runtime", "runsc", id="runtime"),
        pytest.param("require_gvisor", True, id="require-gvisor"),
        pytest.param("container_memory_limit", 512 * MIB, id="memory"),
        pytest.param("container_disk_limit", 64 * MIB, id="disk"),
        pytest.param("container_pids_limit", 100, id="pids"),
        pytest.param("container_cpu_limit", 1.0, id="cpu"),
        pytest.param("max_container_lifetime", 3600, id="lifetime"),
        pytest.param("image_max_size", 2048 * MIB, id="image-size"),
    ],
)
def test_production_default(field: str, expected: Any) -> None:
    settings = load_settings(SupervisorSettings, [])

    assert getattr(settings, field) == expected


def test_production_relaxes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(SupervisorSettings, [])

    with caplog.at_level(logging.WARNING):
        settings.warn_if_relaxed()

    assert settings.relaxed_settings() == {}
    assert caplog.records == []


def test_development_relaxes_listed_settings() -> None:
    settings = load_settings(SupervisorSettings, ["--profile", "development"])

    assert settings.relaxed_settings() == {
        "allow_http_image_urls": True,
        "require_signed_images": False,
        "runtime": "runc",
        "require_gvisor": False,
    }


def test_development_changes_nothing_else() -> None:
    production = load_settings(SupervisorSettings, [])
    development = load_settings(SupervisorSettings, ["--profile", "development"])

    changed = {
        name
        for name in SupervisorSettings.model_fields
        if getattr(production, name) != getattr(development, name)
    }

    assert changed == {"profile", *SupervisorSettings.development_defaults}


def test_development_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_PROFILE", "development")

    settings = load_settings(SupervisorSettings, [])

    assert settings.allow_http_image_urls is True


def test_development_warns_per_relaxed_setting(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(SupervisorSettings, ["--profile", "development"])

    with caplog.at_level(logging.WARNING, logger="libs.common.settings"):
        settings.warn_if_relaxed()

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert [record.__dict__["setting"] for record in warnings] == [
        "allow_http_image_urls",
        "require_signed_images",
        "runtime",
        "require_gvisor",
    ]
    assert "allow_http_image_urls" in warnings[0].getMessage()


def test_development_keeps_explicit_flag() -> None:
    settings = load_settings(
        SupervisorSettings, ["--profile", "development", "--no-allow-http-image-urls"]
    )

    assert settings.allow_http_image_urls is False
    assert settings.relaxed_settings() == {
        "require_signed_images": False,
        "runtime": "runc",
        "require_gvisor": False,
    }


def test_development_keeps_explicit_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNNER_ALLOW_HTTP_IMAGE_URLS", "false")

    settings = load_settings(SupervisorSettings, ["--profile", "development"])

    assert settings.allow_http_image_urls is False
    assert settings.relaxed_settings() == {
        "require_signed_images": False,
        "runtime": "runc",
        "require_gvisor": False,
    }


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        pytest.param(
            ["--container-pids-limit", "-1"], "--container-pids-limit", id="pids-negative"
        ),
        pytest.param(["--container-pids-limit", "7"], "--container-pids-limit", id="pids-too-low"),
        pytest.param(
            ["--container-memory-limit", "lots"], "--container-memory-limit", id="memory-text"
        ),
        pytest.param(["--container-cpu-limit", "0"], "--container-cpu-limit", id="cpu-zero"),
        pytest.param(
            ["--max-container-lifetime", "0"], "--max-container-lifetime", id="lifetime-zero"
        ),
        pytest.param(["--bind-address", "localhost"], "--bind-address", id="bind-hostname"),
        pytest.param(["--runtime", "kata"], "--runtime", id="runtime"),
        pytest.param(["--sandbox-subnet", "172.30.0.0/30"], "--sandbox-subnet", id="subnet-30"),
        pytest.param(["--sandbox-subnet", "8.8.8.0/24"], "--sandbox-subnet", id="subnet-public"),
        pytest.param(
            ["--sandbox-subnet", "172.30.0.1/16"], "--sandbox-subnet", id="subnet-host-bits"
        ),
        pytest.param(
            ["--sandbox-bridge", "a-very-long-bridge"], "--sandbox-bridge", id="bridge-name"
        ),
        pytest.param(
            ["--container-disk-limit", "512MiB"], "--container-disk-limit", id="disk-equals-memory"
        ),
        pytest.param(
            ["--container-disk-limit", "1GiB"], "--container-disk-limit", id="disk-over-memory"
        ),
        pytest.param(
            ["--redis-url", "redis://:pw@127.0.0.1:6379/0"], "--redis-url", id="redis-password"
        ),
        pytest.param(["--host-id", "bad host"], "--host-id", id="host-id"),
        pytest.param(
            ["--docker-host", "unix:///run/docker.sock"], "--docker-host", id="unknown-flag"
        ),
        pytest.param(["--allow-http"], "--allow-http", id="abbreviated-flag"),
    ],
)
def test_invalid_value_names_option(argv: list[str], option: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(SupervisorSettings, argv)

    assert option in str(error.value)


def test_disk_limit_error_names_both_limits() -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings(SupervisorSettings, ["--container-disk-limit", "1GiB"])

    assert "--container-memory-limit" in str(error.value)
    assert str(GIB) in str(error.value)


def test_production_requires_a_signer() -> None:
    settings = load_settings(SupervisorSettings, [])

    with pytest.raises(ConfigurationError) as error:
        load_signature_policy(settings)

    assert "--image-signing-key" in str(error.value)
    assert "--image-signing-trusted-root" in str(error.value)


def test_development_runs_unsigned_without_a_signer() -> None:
    settings = load_settings(SupervisorSettings, ["--profile", "development"])

    assert settings.require_signed_images is False
    assert load_signature_policy(settings) is None


def test_signing_key_loaded(tmp_path: Path) -> None:
    first = write_public_key(make_ecdsa_key(), tmp_path / "first.pub")
    second = write_public_key(make_ed25519_key(), tmp_path / "second.pub")
    settings = load_settings(
        SupervisorSettings, ["--image-signing-key", str(first), "--image-signing-key", str(second)]
    )

    policy = load_signature_policy(settings)

    assert policy is not None
    assert len(policy.keys) == 2


def test_unreadable_signing_key_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pub"
    settings = load_settings(SupervisorSettings, ["--image-signing-key", str(missing)])

    with pytest.raises(ConfigurationError) as error:
        load_signature_policy(settings)

    assert str(missing) in str(error.value)


def test_require_gvisor_rejects_runc() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(SupervisorSettings, ["--runtime", "runc"])

    assert "--require-gvisor is on but --runtime is 'runc'" in str(caught.value)
    assert "--no-require-gvisor" in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param([], "runsc", id="runsc-default-name"),
        pytest.param(["--runsc-docker-runtime", "gvisor-ar"], "gvisor-ar", id="runsc-own-name"),
        pytest.param(
            ["--runtime", "runc", "--no-require-gvisor", "--runsc-docker-runtime", "x"],
            "runc",
            id="runc-ignores-name",
        ),
    ],
)
def test_docker_runtime_name(argv: list[str], expected: str) -> None:
    assert load_settings(SupervisorSettings, argv).docker_runtime == expected
