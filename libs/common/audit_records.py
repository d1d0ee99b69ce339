"""Record format of the audit files: canonical JSON lines chained by SHA-256, signed checkpoints.

The audit sink writes these records and `agent-runner audit verify` checks them, so both use
this module and nothing else defines the format. Every record is one line of canonical JSON
(sorted keys, no spaces, ASCII only), and its hash is the SHA-256 of exactly those bytes. Each
record carries `prev`, the hash of the record before it, and `seq`, one more than the record
before it. A checkpoint record is also signed with Ed25519, so it fixes the whole chain up to
it: changing any earlier record changes a hash that the signature covers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from libs.common.errors import ConfigurationError

FORMAT_VERSION = 1
# `prev` of the very first record of a log, so every record has a 64-hex-digit `prev`.
GENESIS_HASH = "0" * 64
SEGMENT_PATTERN = re.compile(r"^audit-(\d{20})\.jsonl$")
PUBLIC_KEY_PATTERN = "audit-key-*.pub"
# Prefixed to every signed payload, so a signature over audit data can never be mistaken for
# a signature made with the same key for another purpose.
SIGNATURE_CONTEXT = b"agent-runner audit checkpoint v1\n"


class RecordKind(StrEnum):
    """Kind of a record in an audit file."""

    EVENT = "event"
    # A message on an audit subject that is not a valid AuditEvent. It is kept, not dropped, so
    # a misbehaving or hostile publisher still leaves a trace.
    INVALID = "invalid"
    CHECKPOINT = "checkpoint"
    # Written before old segments are deleted. It names the first record that must still exist.
    RETENTION = "retention"


class CheckpointReason(StrEnum):
    """Reason the sink wrote a checkpoint."""

    ANCHOR = "anchor"  # first record of every segment
    START = "start"  # the sink started and continues an existing segment
    INTERVAL = "interval"  # --audit-checkpoint-interval elapsed since the last checkpoint
    SEGMENT_END = "segment_end"  # last record of a full segment
    STOP = "stop"  # the sink stopped cleanly


def canonical_bytes(record: dict[str, Any]) -> bytes:
    """Return the one byte form of `record` that is written, hashed and signed."""
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def record_hash(line: bytes) -> str:
    """Return the hex SHA-256 of one record line, without its newline."""
    return hashlib.sha256(line).hexdigest()


def segment_name(first_seq: int) -> str:
    """Return the file name of the segment whose first record has `first_seq`."""
    return f"audit-{first_seq:020d}.jsonl"


def list_segments(directory: Path) -> list[Path]:
    """Return the segment files in `directory`, oldest first (the names sort by sequence)."""
    return sorted(path for path in directory.iterdir() if SEGMENT_PATTERN.match(path.name))


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the short id of a verification key: 16 hex digits of the SHA-256 of its bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """Return the PEM (SubjectPublicKeyInfo) text of a verification key."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _signed_payload(checkpoint: dict[str, Any]) -> bytes:
    unsigned = {name: value for name, value in checkpoint.items() if name != "signature"}
    return SIGNATURE_CONTEXT + canonical_bytes(unsigned)


@dataclass(frozen=True)
class CheckpointSigner:
    """The sink's Ed25519 signing key and the id that checkpoints name it by."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The verification key that belongs to the signing key."""
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        """Id of the verification key, as written in every checkpoint."""
        return key_id(self.public_key)

    def sign(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Return `checkpoint` with `key_id` and `signature` (base64) added."""
        unsigned = {**checkpoint, "key_id": self.key_id}
        signature = self.private_key.sign(_signed_payload(unsigned))
        return {**unsigned, "signature": base64.b64encode(signature).decode("ascii")}


def signature_is_valid(checkpoint: dict[str, Any], public_key: Ed25519PublicKey) -> bool:
    """Return whether `checkpoint` carries a valid signature by `public_key`."""
    try:
        signature = base64.b64decode(str(checkpoint.get("signature", "")), validate=True)
        public_key.verify(signature, _signed_payload(checkpoint))
    except (InvalidSignature, ValueError):
        return False
    return True


def generate_signing_key(path: Path) -> CheckpointSigner:
    """Create a new Ed25519 key as an unencrypted PKCS#8 PEM file readable by its owner only.

    Raises FileExistsError when `path` exists, so a key in use is never overwritten.
    """
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as output:
        output.write(pem)
    return CheckpointSigner(private_key)


def load_signing_key(path: Path) -> CheckpointSigner:
    """Read an Ed25519 private key from a PEM file.

    Raises ConfigurationError naming the file when it is missing, readable by its group or
    other users, or not an unencrypted Ed25519 key.
    """
    hint = "create one with `agent-runner audit keygen FILE`"
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"--audit-signing-key {str(path)!r} cannot be read: {exc.strerror}; {hint}"
        ) from exc
    if mode & 0o077:
        raise ConfigurationError(
            f"--audit-signing-key {str(path)!r} is readable by its group or other users (mode "
            f"{mode & 0o777:o}); run `chmod 600 {path}`"
        )
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigurationError(
            f"--audit-signing-key {str(path)!r} is not an unencrypted PEM private key: {exc}; "
            f"{hint}"
        ) from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ConfigurationError(
            f"--audit-signing-key {str(path)!r} contains a {type(private_key).__name__}, not an "
            f"Ed25519 key; {hint}"
        )
    return CheckpointSigner(private_key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 verification key from a PEM file.

    Raises ValueError naming the file when it cannot be read or contains another kind of key.
    """
    try:
        public_key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"verification key {str(path)!r} cannot be read: {exc.strerror}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"verification key {str(path)!r} is not a PEM public key: {exc}") from exc
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError(f"verification key {str(path)!r} is not an Ed25519 key")
    return public_key


def write_public_key(directory: Path, public_key: Ed25519PublicKey) -> Path:
    """Write the verification key next to the segments as `audit-key-<key id>.pub`."""
    path = directory / f"audit-key-{key_id(public_key)}.pub"
    if not path.exists():
        temporary = path.with_suffix(".tmp")
        temporary.write_text(public_key_pem(public_key))
        temporary.replace(path)
    return path
