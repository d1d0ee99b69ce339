"""Tests of the audit record format: canonical bytes, signatures and key files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from libs.common.audit_records import (
    canonical_bytes,
    generate_signing_key,
    load_public_key,
    load_signing_key,
    signature_is_valid,
    write_public_key,
)
from libs.common.errors import ConfigurationError


def test_canonical_bytes_are_sorted_ascii() -> None:
    data = canonical_bytes({"b": "\x1b[31mé\u202e", "a": 1})

    assert data == b'{"a":1,"b":"\\u001b[31m\\u00e9\\u202e"}'


def test_canonical_bytes_reject_nan() -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        canonical_bytes({"a": float("nan")})


def test_signature_covers_every_field(tmp_path: Path) -> None:
    signer = generate_signing_key(tmp_path / "key.pem")
    checkpoint = signer.sign({"seq": 5, "prev": "0" * 64})

    assert signature_is_valid(checkpoint, signer.public_key)
    assert not signature_is_valid({**checkpoint, "seq": 6}, signer.public_key)
    assert not signature_is_valid({**checkpoint, "signature": "not base64!"}, signer.public_key)


def test_generated_key_is_private_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    signer = generate_signing_key(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_key(path).key_id == signer.key_id
    with pytest.raises(FileExistsError):
        generate_signing_key(path)


def test_public_key_file_round_trips(tmp_path: Path) -> None:
    signer = generate_signing_key(tmp_path / "key.pem")

    path = write_public_key(tmp_path, signer.public_key)

    assert path.name == f"audit-key-{signer.key_id}.pub"
    assert load_public_key(path) == signer.public_key


def test_missing_key_names_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read") as caught:
        load_signing_key(tmp_path / "absent.pem")

    assert "absent.pem" in str(caught.value)
    assert "agent-runner audit keygen" in str(caught.value)


def test_readable_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    generate_signing_key(path)
    path.chmod(0o640)

    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_signing_key(path)


def test_other_key_type_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)

    with pytest.raises(ConfigurationError, match="not an Ed25519 key"):
        load_signing_key(path)


def test_garbage_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_text("not a key\n")
    path.chmod(0o600)

    with pytest.raises(ConfigurationError, match="not an unencrypted PEM private key"):
        load_signing_key(path)
