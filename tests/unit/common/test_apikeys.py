"""Tests for API key generation, hashing and the key file format."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from libs.common.apikeys import (
    KEY_PREFIX,
    StoredKey,
    generate_key,
    hash_key,
    key_file_line,
    read_key_file,
)
from libs.common.errors import ConfigurationError

HASH = "ab" * 32


def test_generated_key_has_prefix() -> None:
    assert generate_key().startswith(KEY_PREFIX)


def test_generated_key_carries_256_bits() -> None:
    # token_urlsafe(32) encodes 32 random bytes in 43 base64url characters.
    assert len(generate_key()) == len(KEY_PREFIX) + 43


def test_generated_keys_differ() -> None:
    assert generate_key() != generate_key()


def test_hash_key_is_sha256() -> None:
    assert hash_key("ar_example") == hashlib.sha256(b"ar_example").digest()


def test_key_file_line_format() -> None:
    assert (
        key_file_line("ci", "ar_example")
        == f"ci:sha256:{hashlib.sha256(b'ar_example').hexdigest()}"
    )


def test_key_file_line_omits_key() -> None:
    key = generate_key()

    assert key not in key_file_line("ci", key)


def test_key_file_round_trip(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "keys"
    path.write_text(key_file_line("ci", key) + "\n")

    assert read_key_file(path) == [StoredKey(key_id="ci", digest=hash_key(key))]


@pytest.mark.parametrize(
    "key_id",
    [
        pytest.param("", id="empty"),
        pytest.param("a b", id="space"),
        pytest.param("a:b", id="colon"),
        pytest.param("k" * 65, id="too-long"),
        pytest.param("ci\n", id="trailing-newline"),
        pytest.param("ci\nother", id="embedded-newline"),
        pytest.param("#ci", id="comment-marker"),
    ],
)
def test_key_file_line_rejects_invalid_id(key_id: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        key_file_line(key_id, "ar_example")

    assert "key id" in str(error.value)


def test_read_key_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(
        f"# gateway keys\n\n   \nci:sha256:{HASH}\n  # old key\n  ops:sha256:{HASH}  \n"
    )

    keys = read_key_file(path)

    assert [key.key_id for key in keys] == ["ci", "ops"]


def test_read_empty_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("")

    assert read_key_file(path) == []


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("ci", id="id-only"),
        pytest.param(f"ci:{HASH}", id="no-algorithm"),
        pytest.param(f"ci:md5:{HASH}", id="other-algorithm"),
        pytest.param(f"ci:sha256:{HASH.upper()}", id="upper-case-hex"),
        pytest.param(f"ci:sha256:{HASH[:-1]}", id="short-hash"),
        pytest.param(f"ci:sha256:{HASH}0", id="long-hash"),
        pytest.param(f"c i:sha256:{HASH}", id="space-in-id"),
        pytest.param(f":sha256:{HASH}", id="empty-id"),
        pytest.param("ar_plainkeyinfile", id="plain-key"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# keys\nok:sha256:{HASH}\n{line}\n")

    with pytest.raises(ConfigurationError) as error:
        read_key_file(path)

    assert f"{path}:3:" in str(error.value)


def test_duplicate_id_rejected(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"ci:sha256:{HASH}\nops:sha256:{HASH}\nci:sha256:{'cd' * 32}\n")

    with pytest.raises(ConfigurationError) as error:
        read_key_file(path)

    assert f"{path}:3:" in str(error.value)
    assert "'ci'" in str(error.value)


def test_missing_key_file_names_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as error:
        read_key_file(tmp_path / "absent")

    assert "--api-keys-file" in str(error.value)
