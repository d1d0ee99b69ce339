"""The API key file: one hashed key per line, written by `agent-runner keys` and read by the
gateway.

Format: `<key id>:sha256:<64 hex digits>`; blank lines and lines starting with '#' are
ignored. Only hashes are stored, so reading the file does not reveal a usable key. Several
keys may be active at once, which is how keys are rotated: create the new one, move clients
over, revoke the old one.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from libs.common.errors import ConfigurationError

KEY_PREFIX = "ar_"
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEY_LINE = re.compile(r"^(?P<id>[A-Za-z0-9_.-]{1,64}):sha256:(?P<hash>[0-9a-f]{64})$")


@dataclass(frozen=True)
class StoredKey:
    """One accepted key: its public id and the SHA-256 of its secret."""

    key_id: str
    digest: bytes


def hash_key(key: str) -> bytes:
    """Return the SHA-256 digest under which `key` is stored."""
    return hashlib.sha256(key.encode()).digest()


def generate_key() -> str:
    """Return a new random API key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_file_line(key_id: str, key: str) -> str:
    """Return the key-file line that accepts `key` under `key_id`."""
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise ConfigurationError(
            f"key id {key_id!r} is invalid; use 1-64 letters, digits, '.', '_' or '-'"
        )
    return f"{key_id}:sha256:{hash_key(key).hex()}"


def read_key_file(path: Path) -> list[StoredKey]:
    """Return the keys in `path`; raises ConfigurationError naming a malformed line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read --api-keys-file {str(path)!r}: {exc.strerror}"
        ) from exc
    keys: list[StoredKey] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = _KEY_LINE.match(text)
        if match is None:
            raise ConfigurationError(f"{path}:{number}: expected '<key id>:sha256:<64 hex digits>'")
        if any(key.key_id == match["id"] for key in keys):
            raise ConfigurationError(f"{path}:{number}: key id {match['id']!r} appears twice")
        keys.append(StoredKey(key_id=match["id"], digest=bytes.fromhex(match["hash"])))
    return keys
