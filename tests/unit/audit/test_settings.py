"""Tests of the audit sink's settings: the signing key is required in production."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.audit.settings import AuditSettings


def test_production_requires_signing_key() -> None:
    with pytest.raises(ConfigurationError, match="--audit-signing-key is required") as caught:
        load_settings(AuditSettings, [])

    assert "agent-runner audit keygen" in str(caught.value)


def test_production_rejects_generated_key() -> None:
    with pytest.raises(ConfigurationError, match="rejected by the production profile"):
        load_settings(AuditSettings, ["--audit-generate-key"])


def test_development_generates_key(tmp_path: Path) -> None:
    settings = load_settings(AuditSettings, ["--profile=development", f"--audit-dir={tmp_path}"])

    assert settings.audit_generate_key
    assert settings.signing_key_path == tmp_path / "audit-signing.pem"
    assert "audit_generate_key" in settings.relaxed_settings()


@pytest.mark.parametrize(
    "flag",
    [
        "--audit-checkpoint-interval=0",
        "--audit-segment-max-bytes=100",
        "--audit-retention-days=-1",
        "--audit-max-size=-5",
        "--audit-consumer=bad name",
    ],
)
def test_invalid_values_name_option(flag: str, tmp_path: Path) -> None:
    option = flag.partition("=")[0]

    with pytest.raises(ConfigurationError, match=option):
        load_settings(AuditSettings, [f"--audit-signing-key={tmp_path / 'k'}", flag])


def test_sizes_accept_suffixes(tmp_path: Path) -> None:
    settings = load_settings(
        AuditSettings,
        [
            f"--audit-signing-key={tmp_path / 'k'}",
            "--audit-segment-max-bytes=1MiB",
            "--audit-max-size=2GiB",
        ],
    )

    assert settings.audit_segment_max_bytes == 1024 * 1024
    assert settings.audit_max_size == 2 * 1024**3
