"""Tests for image signature verification: cosign key signatures, key bundles, Sigstore bundles.

All trust material comes from tests/support/signing.py: keys made per test and a private
Sigstore instance (CA, CT log, Rekor log). The `no_network` fixture fails any test that would
resolve a name or open a connection, so no verifier can reach a public Sigstore service.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.signatures import (
    SignaturePolicy,
    VerificationMethod,
    Verified,
    key_fingerprint,
    load_public_key,
    verify_image_signature,
)
from tests.support.signing import (
    SigningKey,
    SigstoreInstance,
    file_digest,
    key_bundle,
    make_ecdsa_key,
    make_ed25519_key,
    sign_blob,
    write_public_key,
)

PAYLOAD = bytes(range(256)) * 1200  # 300 KiB, used as the image tarball
IDENTITY = "release@agents.example.test"
ISSUER = "https://oidc.example.test"
KEY_TYPES = [pytest.param(make_ecdsa_key, id="ecdsa"), pytest.param(make_ed25519_key, id="ed25519")]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_on_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"signature verification used the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", fail_on_network)
    monkeypatch.setattr(socket.socket, "connect_ex", fail_on_network)
    monkeypatch.setattr(socket, "getaddrinfo", fail_on_network)


@pytest.fixture
def tarball(tmp_path: Path) -> Path:
    path = tmp_path / "image" / "agent.tar"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


@pytest.fixture
def other_file(tmp_path: Path) -> Path:
    path = tmp_path / "other.tar"
    path.write_bytes(PAYLOAD + b"another image")
    return path


@pytest.fixture(scope="module")
def sigstore() -> SigstoreInstance:
    return SigstoreInstance()


@pytest.fixture
def sigstore_policy(tmp_path: Path, sigstore: SigstoreInstance) -> SignaturePolicy:
    root = sigstore.write_trusted_root(tmp_path / "trusted_root.json")
    return SignaturePolicy.from_files(trusted_root=root, identity=IDENTITY, issuer=ISSUER)


def key_policy(tmp_path: Path, *keys: SigningKey) -> SignaturePolicy:
    files = [write_public_key(key, tmp_path / f"key-{n}.pub") for n, key in enumerate(keys)]
    return SignaturePolicy.from_files(key_files=files)


def verify(
    policy: SignaturePolicy,
    tarball: Path,
    *,
    signature: str | None = None,
    bundle: dict[str, Any] | str | None = None,
) -> Verified:
    return verify_image_signature(
        policy, tarball=tarball, digest=file_digest(tarball), signature=signature, bundle=bundle
    )


def reject(
    policy: SignaturePolicy,
    tarball: Path,
    *,
    signature: str | None = None,
    bundle: dict[str, Any] | str | None = None,
) -> ImageRejected:
    """Run a verification that must fail; check that it left no file and hid the signature."""
    before = sorted(tarball.parent.iterdir())
    with pytest.raises(ImageRejected) as error:
        verify(policy, tarball, signature=signature, bundle=bundle)

    assert sorted(tarball.parent.iterdir()) == before
    secrets = [signature.strip()] if signature and signature.strip() else []
    if isinstance(bundle, dict) and "messageSignature" in bundle:
        secrets.append(bundle["messageSignature"]["signature"])
    for secret in secrets:
        assert secret not in str(error.value)
    return error.value


# Key signatures, as `cosign sign-blob --key` prints them


@pytest.mark.parametrize("make_key", KEY_TYPES)
def test_key_signature_accepted(make_key: Any, tarball: Path, tmp_path: Path) -> None:
    key = make_key()
    policy = key_policy(tmp_path, make_ecdsa_key(), key)

    verified = verify(policy, tarball, signature=sign_blob(tarball, key))

    assert verified.method == VerificationMethod.KEY
    assert verified.key_fingerprint == key_fingerprint(key.public_key())
    assert verified.identity is None


def test_signature_with_trailing_newline_accepted(tarball: Path, tmp_path: Path) -> None:
    key = make_ecdsa_key()

    verified = verify(key_policy(tmp_path, key), tarball, signature=sign_blob(tarball, key) + "\n")

    assert verified.method == VerificationMethod.KEY


def test_ecdsa_checks_digest_not_file(tarball: Path, tmp_path: Path) -> None:
    key = make_ecdsa_key()
    signature = sign_blob(tarball, key)
    digest = file_digest(tarball)
    tarball.unlink()

    verified = verify_image_signature(
        key_policy(tmp_path, key), tarball=tarball, digest=digest, signature=signature, bundle=None
    )

    assert verified.key_fingerprint == key_fingerprint(key.public_key())


def test_ed25519_signature_of_empty_file_accepted(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    key = make_ed25519_key()

    verified = verify(key_policy(tmp_path, key), empty, signature=sign_blob(empty, key))

    assert verified.method == VerificationMethod.KEY


@pytest.mark.parametrize("make_key", KEY_TYPES)
def test_wrong_key_rejected(make_key: Any, tarball: Path, tmp_path: Path) -> None:
    policy = key_policy(tmp_path, make_key())

    error = reject(policy, tarball, signature=sign_blob(tarball, make_key()))

    assert error.reason == FailureReason.SIGNATURE_INVALID
    assert "--image-signing-key" in error.message


@pytest.mark.parametrize("make_key", KEY_TYPES)
def test_signature_of_other_file_rejected(
    make_key: Any, tarball: Path, other_file: Path, tmp_path: Path
) -> None:
    key = make_key()

    error = reject(key_policy(tmp_path, key), tarball, signature=sign_blob(other_file, key))

    # A bare signature does not name the file it signs, so this is not a digest mismatch.
    assert error.reason == FailureReason.SIGNATURE_INVALID


@pytest.mark.parametrize("make_key", KEY_TYPES)
def test_tarball_changed_after_signing(make_key: Any, tarball: Path, tmp_path: Path) -> None:
    key = make_key()
    signature = sign_blob(tarball, key)
    with tarball.open("r+b") as image:
        image.seek(1000)
        image.write(b"\xff")

    error = reject(key_policy(tmp_path, key), tarball, signature=signature)

    assert error.reason == FailureReason.SIGNATURE_INVALID


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param("not base64 at all!", id="not-base64"),
        pytest.param("MEUCIQ", id="bad-padding"),
        pytest.param(base64.b64encode(b"\x30\x06garbage").decode(), id="not-der"),
        pytest.param(base64.b64encode(os.urandom(64)).decode(), id="random-64-bytes"),
        pytest.param("A" * 2000, id="too-long"),
    ],
)
def test_garbage_signature_rejected(signature: str, tarball: Path, tmp_path: Path) -> None:
    policy = key_policy(tmp_path, make_ecdsa_key(), make_ed25519_key())

    error = reject(policy, tarball, signature=signature)

    assert error.reason == FailureReason.SIGNATURE_INVALID


@pytest.mark.parametrize("signature", [None, "", "  \n"])
def test_no_signature_rejected(signature: str | None, tarball: Path, tmp_path: Path) -> None:
    error = reject(key_policy(tmp_path, make_ecdsa_key()), tarball, signature=signature)

    assert error.reason == FailureReason.SIGNATURE_MISSING
    assert file_digest(tarball) in error.message


def test_signature_and_bundle_together_rejected(tarball: Path, tmp_path: Path) -> None:
    key = make_ecdsa_key()

    error = reject(
        key_policy(tmp_path, key),
        tarball,
        signature=sign_blob(tarball, key),
        bundle=key_bundle(tarball, key),
    )

    assert error.reason == FailureReason.SIGNATURE_INVALID
    assert "only one" in error.message


def test_key_signature_without_keys_not_trusted(
    tarball: Path, sigstore_policy: SignaturePolicy
) -> None:
    error = reject(sigstore_policy, tarball, signature=sign_blob(tarball, make_ecdsa_key()))

    assert error.reason == FailureReason.SIGNER_NOT_TRUSTED


def test_malformed_digest_is_caller_error(tarball: Path, tmp_path: Path) -> None:
    key = make_ecdsa_key()

    with pytest.raises(ValueError, match="sha256:<64"):
        verify_image_signature(
            key_policy(tmp_path, key),
            tarball=tarball,
            digest=file_digest(tarball).upper(),
            signature=sign_blob(tarball, key),
            bundle=None,
        )


# Key bundles, as `cosign sign-blob --key --bundle` (cosign v3) writes them


@pytest.mark.parametrize("make_key", KEY_TYPES)
def test_key_bundle_accepted(make_key: Any, tarball: Path, tmp_path: Path) -> None:
    key = make_key()
    bundle = key_bundle(tarball, key)

    verified = verify(key_policy(tmp_path, make_ecdsa_key(), key), tarball, bundle=bundle)

    assert "tlogEntries" not in bundle["verificationMaterial"]
    assert verified.method == VerificationMethod.KEY
    assert verified.key_fingerprint == key_fingerprint(key.public_key())


def test_key_bundle_as_text_accepted(tarball: Path, tmp_path: Path) -> None:
    key = make_ecdsa_key()

    verified = verify(
        key_policy(tmp_path, key), tarball, bundle=json.dumps(key_bundle(tarball, key))
    )

    assert verified.method == VerificationMethod.KEY


def test_key_bundle_hint_ignored(tarball: Path, tmp_path: Path) -> None:
    key = make_ecdsa_key()
    bundle = key_bundle(tarball, key)
    bundle["verificationMaterial"]["publicKey"]["hint"] = "unknown key"

    verified = verify(key_policy(tmp_path, key), tarball, bundle=bundle)

    assert verified.key_fingerprint == key_fingerprint(key.public_key())


@pytest.mark.parametrize("make_key", KEY_TYPES)
def test_key_bundle_wrong_key_rejected(make_key: Any, tarball: Path, tmp_path: Path) -> None:
    error = reject(
        key_policy(tmp_path, make_key()), tarball, bundle=key_bundle(tarball, make_key())
    )

    assert error.reason == FailureReason.SIGNATURE_INVALID


def test_ecdsa_key_bundle_of_other_file(tarball: Path, other_file: Path, tmp_path: Path) -> None:
    key = make_ecdsa_key()

    error = reject(key_policy(tmp_path, key), tarball, bundle=key_bundle(other_file, key))

    # The bundle names its digest and the signature verifies over it: a genuine signature
    # of another file.
    assert error.reason == FailureReason.SIGNATURE_DIGEST_MISMATCH
    assert file_digest(other_file) in error.message
    assert file_digest(tarball) in error.message


def test_ed25519_key_bundle_of_other_file(tarball: Path, other_file: Path, tmp_path: Path) -> None:
    key = make_ed25519_key()

    error = reject(key_policy(tmp_path, key), tarball, bundle=key_bundle(other_file, key))

    # Ed25519 signs the file itself, which is not here, so the signature cannot be checked.
    assert error.reason == FailureReason.SIGNATURE_INVALID
    assert file_digest(other_file) in error.message


def test_key_bundle_with_edited_digest_rejected(
    tarball: Path, other_file: Path, tmp_path: Path
) -> None:
    key = make_ecdsa_key()
    bundle = key_bundle(other_file, key)
    bundle["messageSignature"]["messageDigest"] = key_bundle(tarball, key)["messageSignature"][
        "messageDigest"
    ]

    error = reject(key_policy(tmp_path, key), tarball, bundle=bundle)

    assert error.reason == FailureReason.SIGNATURE_INVALID


def test_key_bundle_without_stated_digest_accepted(tarball: Path, tmp_path: Path) -> None:
    key = make_ecdsa_key()
    bundle = key_bundle(tarball, key)
    del bundle["messageSignature"]["messageDigest"]

    verified = verify(key_policy(tmp_path, key), tarball, bundle=bundle)

    assert verified.method == VerificationMethod.KEY


def dsse_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(bundle)
    del changed["messageSignature"]
    changed["dsseEnvelope"] = {
        "payload": base64.b64encode(b"{}").decode(),
        "payloadType": "application/vnd.in-toto+json",
        "signatures": [{"sig": base64.b64encode(b"x" * 70).decode(), "keyid": ""}],
    }
    return changed


def sha512_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(bundle)
    changed["messageSignature"]["messageDigest"]["algorithm"] = "SHA2_512"
    return changed


def unknown_field_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    return {**bundle, "extraField": True}


def unknown_media_type_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    return {**bundle, "mediaType": "application/vnd.dev.sigstore.bundle.v9+json"}


def no_signature_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in bundle.items() if key != "messageSignature"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(dsse_bundle, "DSSE", id="dsse-envelope"),
        pytest.param(sha512_bundle, "SHA2_512", id="sha512-digest"),
        pytest.param(unknown_field_bundle, "extraField", id="unknown-field"),
        pytest.param(unknown_media_type_bundle, "mediaType", id="unknown-media-type"),
        pytest.param(no_signature_bundle, "messageSignature", id="no-signature"),
    ],
)
def test_malformed_bundle_rejected(
    change: Any, expected: str, tarball: Path, tmp_path: Path
) -> None:
    key = make_ecdsa_key()

    error = reject(key_policy(tmp_path, key), tarball, bundle=change(key_bundle(tarball, key)))

    assert error.reason == FailureReason.SIGNATURE_INVALID
    assert expected in error.message


@pytest.mark.parametrize(
    "bundle",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param("[1, 2]", id="json-array"),
        pytest.param("{}", id="empty-object"),
    ],
)
def test_unparseable_bundle_rejected(bundle: str, tarball: Path, tmp_path: Path) -> None:
    error = reject(key_policy(tmp_path, make_ecdsa_key()), tarball, bundle=bundle)

    assert error.reason == FailureReason.SIGNATURE_INVALID
    assert "bundle" in error.message


# Sigstore certificate bundles, verified offline against the private instance


@pytest.mark.parametrize(
    ("identity", "kind"),
    [
        pytest.param(IDENTITY, "email", id="email"),
        pytest.param("https://ci.example.test/release.yml@refs/heads/main", "uri", id="uri"),
    ],
)
def test_sigstore_bundle_accepted(
    identity: str, kind: Any, tarball: Path, tmp_path: Path, sigstore: SigstoreInstance
) -> None:
    root = sigstore.write_trusted_root(tmp_path / "trusted_root.json")
    policy = SignaturePolicy.from_files(trusted_root=root, identity=identity, issuer=ISSUER)
    bundle = sigstore.sign(tarball, identity=identity, issuer=ISSUER, identity_kind=kind)

    verified = verify(policy, tarball, bundle=bundle)

    assert verified.method == VerificationMethod.SIGSTORE
    assert verified.identity == identity
    assert verified.issuer == ISSUER
    assert verified.key_fingerprint is None


def test_sigstore_bundle_as_text_accepted(
    tarball: Path, sigstore: SigstoreInstance, sigstore_policy: SignaturePolicy
) -> None:
    bundle = json.dumps(sigstore.sign(tarball, identity=IDENTITY, issuer=ISSUER))

    verified = verify(sigstore_policy, tarball, bundle=bundle)

    assert verified.method == VerificationMethod.SIGSTORE


def test_keys_and_sigstore_together(
    tarball: Path, tmp_path: Path, sigstore: SigstoreInstance
) -> None:
    key = make_ecdsa_key()
    policy = SignaturePolicy.from_files(
        key_files=[write_public_key(key, tmp_path / "cosign.pub")],
        trusted_root=sigstore.write_trusted_root(tmp_path / "trusted_root.json"),
        identity=IDENTITY,
        issuer=ISSUER,
    )

    by_key = verify(policy, tarball, signature=sign_blob(tarball, key))
    by_identity = verify(
        policy, tarball, bundle=sigstore.sign(tarball, identity=IDENTITY, issuer=ISSUER)
    )

    assert by_key.method == VerificationMethod.KEY
    assert by_identity.method == VerificationMethod.SIGSTORE


def test_sigstore_unpinned_identity_rejected(
    tarball: Path, sigstore: SigstoreInstance, sigstore_policy: SignaturePolicy
) -> None:
    bundle = sigstore.sign(tarball, identity="intruder@agents.example.test", issuer=ISSUER)

    error = reject(sigstore_policy, tarball, bundle=bundle)

    assert error.reason == FailureReason.SIGNER_NOT_TRUSTED
    assert "intruder@agents.example.test" in error.message
    assert IDENTITY in error.message


def test_sigstore_other_issuer_rejected(
    tarball: Path, sigstore: SigstoreInstance, sigstore_policy: SignaturePolicy
) -> None:
    bundle = sigstore.sign(tarball, identity=IDENTITY, issuer="https://accounts.example.test")

    error = reject(sigstore_policy, tarball, bundle=bundle)

    assert error.reason == FailureReason.SIGNER_NOT_TRUSTED
    assert "https://accounts.example.test" in error.message


def test_sigstore_bundle_of_other_file(
    tarball: Path, other_file: Path, sigstore: SigstoreInstance, sigstore_policy: SignaturePolicy
) -> None:
    bundle = sigstore.sign(other_file, identity=IDENTITY, issuer=ISSUER)

    error = reject(sigstore_policy, tarball, bundle=bundle)

    assert error.reason == FailureReason.SIGNATURE_DIGEST_MISMATCH
    assert file_digest(other_file) in error.message


def test_sigstore_bundle_with_edited_digest(
    tarball: Path, other_file: Path, sigstore: SigstoreInstance, sigstore_policy: SignaturePolicy
) -> None:
    bundle = sigstore.sign(other_file, identity=IDENTITY, issuer=ISSUER)
    honest = sigstore.sign(tarball, identity=IDENTITY, issuer=ISSUER)
    bundle["messageSignature"]["messageDigest"] = honest["messageSignature"]["messageDigest"]

    error = reject(sigstore_policy, tarball, bundle=bundle)

    assert error.reason == FailureReason.SIGNATURE_INVALID


def test_sigstore_bundle_from_other_ca(tarball: Path, sigstore_policy: SignaturePolicy) -> None:
    stranger = SigstoreInstance(name="stranger")

    error = reject(
        sigstore_policy, tarball, bundle=stranger.sign(tarball, identity=IDENTITY, issuer=ISSUER)
    )

    assert error.reason == FailureReason.SIGNER_NOT_TRUSTED
    assert "--image-signing-trusted-root" in error.message


def break_set(entry: dict[str, Any]) -> None:
    promise = entry["inclusionPromise"]
    promise["signedEntryTimestamp"] = base64.b64encode(b"\x30\x06" + b"\x00" * 6).decode()


def break_proof(entry: dict[str, Any]) -> None:
    entry["inclusionProof"]["hashes"][0] = base64.b64encode(b"\x00" * 32).decode()


def break_checkpoint(entry: dict[str, Any]) -> None:
    checkpoint = entry["inclusionProof"]["checkpoint"]
    checkpoint["envelope"] = checkpoint["envelope"].replace(" - ", " - 1", 1)


def break_body(entry: dict[str, Any]) -> None:
    body = json.loads(base64.b64decode(entry["canonicalizedBody"]))
    body["spec"]["data"]["hash"]["value"] = "0" * 64
    entry["canonicalizedBody"] = base64.b64encode(json.dumps(body).encode()).decode()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(break_set, id="signed-entry-timestamp"),
        pytest.param(break_proof, id="inclusion-proof"),
        pytest.param(break_checkpoint, id="checkpoint"),
        pytest.param(break_body, id="entry-body"),
    ],
)
def test_sigstore_log_entry_tampering_rejected(
    change: Any, tarball: Path, sigstore: SigstoreInstance, sigstore_policy: SignaturePolicy
) -> None:
    bundle = sigstore.sign(tarball, identity=IDENTITY, issuer=ISSUER)
    change(bundle["verificationMaterial"]["tlogEntries"][0])

    error = reject(sigstore_policy, tarball, bundle=bundle)

    assert error.reason == FailureReason.SIGNATURE_INVALID


def test_sigstore_bundle_without_log_entry_rejected(
    tarball: Path, sigstore: SigstoreInstance, sigstore_policy: SignaturePolicy
) -> None:
    bundle = sigstore.sign(tarball, identity=IDENTITY, issuer=ISSUER)
    bundle["verificationMaterial"]["tlogEntries"] = []

    error = reject(sigstore_policy, tarball, bundle=bundle)

    assert error.reason == FailureReason.SIGNATURE_INVALID


def test_sigstore_signature_swapped_rejected(
    tarball: Path, sigstore: SigstoreInstance, sigstore_policy: SignaturePolicy
) -> None:
    bundle = sigstore.sign(tarball, identity=IDENTITY, issuer=ISSUER)
    bundle["messageSignature"]["signature"] = sign_blob(tarball, make_ecdsa_key())

    error = reject(sigstore_policy, tarball, bundle=bundle)

    assert error.reason == FailureReason.SIGNATURE_INVALID


def test_sigstore_bundle_without_trusted_root(
    tarball: Path, tmp_path: Path, sigstore: SigstoreInstance
) -> None:
    policy = key_policy(tmp_path, make_ecdsa_key())

    error = reject(policy, tarball, bundle=sigstore.sign(tarball, identity=IDENTITY, issuer=ISSUER))

    assert error.reason == FailureReason.SIGNER_NOT_TRUSTED
    assert "--image-signing-trusted-root" in error.message


# Settings, validated at startup


def write_pem(path: Path, key: Any, *, private: bool = False) -> Path:
    if private:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        data = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make_file", "expected"),
    [
        pytest.param(
            lambda path: write_pem(path, rsa.generate_private_key(65537, 2048)),
            "RSA key is not supported",
            id="rsa",
        ),
        pytest.param(
            lambda path: write_pem(path, ec.generate_private_key(ec.SECP384R1())),
            "curve secp384r1",
            id="p384",
        ),
        pytest.param(
            lambda path: write_pem(path, make_ecdsa_key(), private=True),
            "private key",
            id="private-key",
        ),
        pytest.param(
            lambda path: path.write_text("not a key\n") and path,
            "not a PEM PUBLIC KEY",
            id="not-pem",
        ),
        pytest.param(lambda path: path, "cannot read", id="missing"),
    ],
)
def test_bad_key_file_rejected(make_file: Any, expected: str, tmp_path: Path) -> None:
    path = make_file(tmp_path / "cosign.pub")

    with pytest.raises(ValueError, match=expected) as error:
        SignaturePolicy.from_files(key_files=[path])

    assert str(path) in str(error.value)


def test_key_file_loaded(tmp_path: Path) -> None:
    key = make_ed25519_key()

    loaded = load_public_key(write_public_key(key, tmp_path / "cosign.pub"))

    assert key_fingerprint(loaded) == key_fingerprint(key.public_key())


def test_unsupported_key_object_rejected() -> None:
    with pytest.raises(ValueError, match="RSA key is not supported"):
        SignaturePolicy(keys=(rsa.generate_private_key(65537, 2048).public_key(),))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("identity", "issuer", "expected"),
    [
        pytest.param(IDENTITY, None, "needs --image-signing-issuer", id="no-issuer"),
        pytest.param(None, ISSUER, "needs --image-signing-identity", id="no-identity"),
        pytest.param(
            None, None, "--image-signing-identity and --image-signing-issuer", id="neither"
        ),
        pytest.param("", ISSUER, "--image-signing-identity ''", id="empty-identity"),
        pytest.param(IDENTITY, " https://oidc.example.test", "--image-signing-issuer", id="space"),
    ],
)
def test_incomplete_sigstore_settings_rejected(
    identity: str | None,
    issuer: str | None,
    expected: str,
    tmp_path: Path,
    sigstore: SigstoreInstance,
) -> None:
    root = sigstore.write_trusted_root(tmp_path / "trusted_root.json")

    with pytest.raises(ValueError, match=expected):
        SignaturePolicy.from_files(trusted_root=root, identity=identity, issuer=issuer)


def test_identity_without_trusted_root_rejected(tmp_path: Path) -> None:
    key = write_public_key(make_ecdsa_key(), tmp_path / "cosign.pub")

    with pytest.raises(ValueError, match="need --image-signing-trusted-root"):
        SignaturePolicy.from_files(key_files=[key], identity=IDENTITY, issuer=ISSUER)


def test_policy_without_signer_rejected() -> None:
    with pytest.raises(ValueError, match="give --image-signing-key or --image-signing-trusted"):
        SignaturePolicy.from_files()


def missing_root(path: Path, root: dict[str, Any]) -> Path:
    return path


def directory_root(path: Path, root: dict[str, Any]) -> Path:
    path.mkdir()
    return path


def invalid_json_root(path: Path, root: dict[str, Any]) -> Path:
    path.write_text("{")
    return path


def other_media_type_root(path: Path, root: dict[str, Any]) -> Path:
    path.write_text(json.dumps({**root, "mediaType": "application/vnd.dev.sigstore.bundle+json"}))
    return path


def v02_media_type_root(path: Path, root: dict[str, Any]) -> Path:
    media_type = "application/vnd.dev.sigstore.trustedroot.v0.2+json"
    path.write_text(json.dumps({**root, "mediaType": media_type}))
    return path


def no_ctlogs_root(path: Path, root: dict[str, Any]) -> Path:
    path.write_text(json.dumps({**root, "ctlogs": []}))
    return path


def bad_certificate_root(path: Path, root: dict[str, Any]) -> Path:
    broken = copy.deepcopy(root)
    broken["certificateAuthorities"][0]["certChain"]["certificates"][0]["rawBytes"] = "AAAA"
    path.write_text(json.dumps(broken))
    return path


@pytest.mark.parametrize(
    ("make_root", "expected"),
    [
        pytest.param(missing_root, "cannot read trusted root", id="missing"),
        pytest.param(directory_root, "cannot read trusted root", id="directory"),
        pytest.param(invalid_json_root, "not a Sigstore trusted_root.json", id="invalid-json"),
        pytest.param(other_media_type_root, "mediaType", id="other-media-type"),
        pytest.param(v02_media_type_root, "unsupported trusted root format", id="v0.2"),
        pytest.param(no_ctlogs_root, "has no ctlogs", id="no-ctlogs"),
        pytest.param(bad_certificate_root, "not usable", id="bad-certificate"),
    ],
)
def test_bad_trusted_root_rejected(
    make_root: Any, expected: str, tmp_path: Path, sigstore: SigstoreInstance
) -> None:
    path = make_root(tmp_path / "trusted_root.json", sigstore.trusted_root())

    with pytest.raises(ValueError, match=expected) as error:
        SignaturePolicy.from_files(trusted_root=path, identity=IDENTITY, issuer=ISSUER)

    assert str(path) in str(error.value)
