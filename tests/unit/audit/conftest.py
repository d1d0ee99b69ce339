"""Fixtures of the audit unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.audit_records import CheckpointSigner, generate_signing_key


@pytest.fixture
def signer(tmp_path: Path) -> CheckpointSigner:
    return generate_signing_key(tmp_path / "keys" / "signing.pem")
