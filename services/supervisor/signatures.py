"""Image signature verification: a cosign key signature or a Sigstore bundle over the tarball.

Runs after the download's SHA-256 equals the requested digest and before the tarball is
inspected or loaded, on hosts configured with signing keys or a Sigstore trusted root. Two
kinds of proof are accepted:

- a key signature, as `cosign sign-blob --key` prints it or inside a v0.3 bundle with a
  `publicKey` hint (cosign v3 `--bundle`), checked with `cryptography` against the configured
  public keys;
- a Sigstore certificate bundle (keyless `cosign sign-blob --bundle`), checked offline by
  sigstore-python against the configured trusted_root.json, with the certificate's identity
  and OIDC issuer pinned by exact match.

Every rejection is an ImageRejected with one of four reason codes. Messages name the failing
value and the fix and never contain signature bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import mmap
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pydantic import ValidationError
from sigstore.errors import CertValidationError, VerificationError
from sigstore.errors import Error as SigstoreError
from sigstore.hashes import Hashed
from sigstore.models import Bundle, TrustedRoot
from sigstore.verify import Verifier
from sigstore.verify.policy import Identity
from sigstore_models.bundle import v1 as bundle_v1
from sigstore_models.common.v1 import HashAlgorithm
from sigstore_models.trustroot import v1 as trustroot_v1

from libs.common import logs
from services.supervisor.errors import FailureReason, ImageRejected

logger = logging.getLogger(__name__)

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# Option names as the settings declare them; messages tell the operator which one to change.
KEY_OPTION = "--image-signing-key"
TRUSTED_ROOT_OPTION = "--image-signing-trusted-root"
IDENTITY_OPTION = "--image-signing-identity"
ISSUER_OPTION = "--image-signing-issuer"

# A DER ECDSA P-256 signature is at most 72 bytes and Ed25519 is 64, so 96 base64 characters
# would do. The bound only stops a huge value from being decoded.
MAX_SIGNATURE_CHARS = 1024
ED25519_SIGNATURE_SIZE = 64
# sigstore-python's messages can dump whole inclusion proofs; the reason is in the first part.
MAX_DETAIL_CHARS = 200
_DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


class VerificationMethod(StrEnum):
    """Method by which an image signature was verified."""

    KEY = "key"
    SIGSTORE = "sigstore"


@dataclass(frozen=True, kw_only=True)
class Verified:
    """Signer of an image, for the audit trail: a key fingerprint or a Sigstore identity."""

    method: VerificationMethod
    key_fingerprint: str | None = None
    identity: str | None = None
    issuer: str | None = None


def key_fingerprint(key: PublicKey) -> str:
    """Return `sha256:<hex>` of the key's DER SubjectPublicKeyInfo.

    cosign's bundle hint is the base64 form of the same hash.
    """
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, kw_only=True)
class SignaturePolicy:
    """Signers whose images this host accepts: public keys and a pinned Sigstore identity.

    Build it only when signature checks are on: at least one key or a trusted root is
    required, and a trusted root needs both `identity` and `issuer` (exact match). The
    constructor validates everything and raises ValueError naming the problem.
    """

    keys: tuple[PublicKey, ...] = ()
    trusted_root: Path | None = None
    identity: str | None = None
    issuer: str | None = None
    _root: TrustedRoot | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in self.keys:
            problem = _unsupported_key_problem(key)
            if problem:
                raise ValueError(f"{problem}; use an ECDSA P-256 or Ed25519 public key")
        _check_sigstore_options(self.trusted_root, identity=self.identity, issuer=self.issuer)
        if not self.keys and self.trusted_root is None:
            raise ValueError(
                f"image signature checks need a trusted signer: give {KEY_OPTION} or "
                f"{TRUSTED_ROOT_OPTION}"
            )

        if self.trusted_root is not None:
            object.__setattr__(self, "_root", _load_trusted_root(self.trusted_root))

    @classmethod
    def from_files(
        cls,
        *,
        key_files: Sequence[Path] = (),
        trusted_root: Path | None = None,
        identity: str | None = None,
        issuer: str | None = None,
    ) -> SignaturePolicy:
        """Load PEM public keys and the trusted root, and validate the combination.

        Raises ValueError naming the file or option at fault, for a startup error.
        """
        keys = tuple(load_public_key(path) for path in key_files)
        return cls(keys=keys, trusted_root=trusted_root, identity=identity, issuer=issuer)


def load_public_key(path: Path) -> PublicKey:
    """Load an ECDSA P-256 or Ed25519 `PUBLIC KEY` PEM file; raise ValueError otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read signing key {str(path)!r} ({KEY_OPTION}): {exc}") from exc
    if b"PRIVATE KEY" in data:
        raise ValueError(
            f"signing key file {str(path)!r} contains a private key; give the public key "
            f"(cosign.pub) to {KEY_OPTION}"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(
            f"signing key file {str(path)!r} is not a PEM PUBLIC KEY ({KEY_OPTION}); export "
            "it with `cosign public-key` or `openssl pkey -pubout`"
        ) from exc

    problem = _unsupported_key_problem(key)
    if problem or not isinstance(key, PublicKey):
        raise ValueError(
            f"signing key file {str(path)!r}: {problem}; use an ECDSA P-256 or Ed25519 key"
        )
    return key


def _unsupported_key_problem(key: object) -> str | None:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return None
        return f"ECDSA key on curve {key.curve.name} is not supported"
    key_type = type(key).__name__.removeprefix("_").removesuffix("PublicKey") or "unknown"
    return f"{key_type} key is not supported"


def _check_sigstore_options(
    trusted_root: Path | None, *, identity: str | None, issuer: str | None
) -> None:
    values = {IDENTITY_OPTION: identity, ISSUER_OPTION: issuer}
    for option, value in values.items():
        if value is not None and (not value or value != value.strip()):
            raise ValueError(f"{option} {value!r} must be a non-empty value without spaces")
    if trusted_root is None:
        stray = [option for option, value in values.items() if value is not None]
        if stray:
            raise ValueError(f"{' and '.join(stray)} need {TRUSTED_ROOT_OPTION}")
        return
    missing = [option for option, value in values.items() if value is None]
    if missing:
        raise ValueError(
            f"{TRUSTED_ROOT_OPTION} needs {' and '.join(missing)}: Sigstore signatures are "
            "accepted only from one pinned identity and OIDC issuer"
        )


def _load_trusted_root(path: Path) -> TrustedRoot:
    """Parse and check a trusted_root.json; raise ValueError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"cannot read trusted root {str(path)!r} ({TRUSTED_ROOT_OPTION}): {exc}"
        ) from exc
    try:
        document = trustroot_v1.TrustedRoot.from_json(raw)
    except ValidationError as exc:
        raise ValueError(
            f"trusted root {str(path)!r} is not a Sigstore trusted_root.json: {_summarize(exc)}"
        ) from exc

    empty = [
        name
        for name, entries in (
            ("certificateAuthorities", document.certificate_authorities),
            ("tlogs", document.tlogs),
            ("ctlogs", document.ctlogs),
        )
        if not entries
    ]
    if empty:
        raise ValueError(
            f"trusted root {str(path)!r} has no {', '.join(empty)}; it must list the CA, "
            "the transparency log and the CT log that sign images"
        )

    try:
        root = TrustedRoot(document)
        # Loads the CA certificates, so that a broken one stops the start, not a request.
        Verifier(trusted_root=root)
    except (SigstoreError, ValueError) as exc:
        raise ValueError(f"trusted root {str(path)!r} is not usable: {exc}") from exc
    return root


def verify_image_signature(
    policy: SignaturePolicy,
    *,
    tarball: Path,
    digest: str,
    signature: str | None,
    bundle: dict[str, Any] | str | None,
) -> Verified:
    """Verify that a trusted signer signed the tarball whose SHA-256 is `digest`.

    `digest` (`sha256:<hex>`) must be the hash of `tarball`, computed by the caller. Give
    either `signature` (base64, from `cosign sign-blob --key`) or `bundle` (a Sigstore bundle
    as JSON text or parsed). ECDSA is checked against the digest alone; Ed25519 signs the
    whole file, which is then read through a read-only memory map. Raises ImageRejected with
    a signature reason code; raises ValueError if `digest` is malformed.
    """
    if not _DIGEST_PATTERN.fullmatch(digest):
        raise ValueError(f"digest {digest!r} is not sha256:<64 lowercase hex digits>")
    raw_digest = bytes.fromhex(digest.removeprefix("sha256:"))
    if signature is not None and not signature.strip():
        signature = None

    if signature is not None and bundle is not None:
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            "both a signature and a bundle were given; send only one of them",
        )
    if signature is not None:
        verified = _verify_key_signature(
            policy, _decode_base64(signature), digest=raw_digest, tarball=tarball
        )
    elif bundle is not None:
        verified = _verify_bundle(policy, bundle, digest=raw_digest, tarball=tarball)
    else:
        raise ImageRejected(
            FailureReason.SIGNATURE_MISSING,
            f"image {digest} has no signature; this host accepts only signed images. Sign the "
            "tarball with `cosign sign-blob` and send its signature or bundle",
        )

    logger.info(
        "image %s signature verified (%s %s)",
        digest,
        verified.method.value,
        verified.key_fingerprint or f"{verified.identity} from {verified.issuer}",
        extra={logs.IMAGE_DIGEST: digest},
    )
    return verified


def _decode_base64(text: str) -> bytes:
    text = text.strip()
    if len(text) > MAX_SIGNATURE_CHARS:
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            f"signature is {len(text)} characters long, more than {MAX_SIGNATURE_CHARS}; "
            "send the base64 output of `cosign sign-blob --key` unchanged",
        )
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            "signature is not valid base64; send the output of `cosign sign-blob --key` unchanged",
        ) from exc


def _verify_key_signature(
    policy: SignaturePolicy, signature: bytes, *, digest: bytes, tarball: Path
) -> Verified:
    _require_keys(policy)
    key = _find_signing_key(policy.keys, signature, digest=digest, tarball=tarball)
    if key is None:
        # A bare signature does not name the file it signs, so a signature over another
        # file cannot be distinguished from a forged one. Both are signature_invalid.
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            f"signature does not verify with any of the {len(policy.keys)} keys given to "
            f"{KEY_OPTION}; sign this exact tarball with one of those keys",
        )
    return Verified(method=VerificationMethod.KEY, key_fingerprint=key_fingerprint(key))


def _require_keys(policy: SignaturePolicy) -> None:
    if not policy.keys:
        raise ImageRejected(
            FailureReason.SIGNER_NOT_TRUSTED,
            f"image is signed with a key, but this host trusts no keys ({KEY_OPTION}); "
            "sign it with the Sigstore identity this host accepts",
        )


def _find_signing_key(
    keys: Sequence[PublicKey], signature: bytes, *, digest: bytes, tarball: Path | None
) -> PublicKey | None:
    """Return the first key under which `signature` verifies, or None.

    ECDSA keys are checked against `digest`. Ed25519 keys need the signed file itself, so
    they are tried only when `tarball` is given and hashes to `digest`.
    """
    # NOTE: only plain Ed25519 is checked. An Ed25519ph (prehashed) signature is rejected as
    # signature_invalid, because cryptography 44 does not implement Ed25519ph.
    for key in keys:
        if isinstance(key, ec.EllipticCurvePublicKey):
            try:
                key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
            except InvalidSignature:
                continue
            return key
    if tarball is None or len(signature) != ED25519_SIGNATURE_SIZE:
        return None
    for key in keys:
        if isinstance(key, ed25519.Ed25519PublicKey) and _ed25519_verifies(key, signature, tarball):
            return key
    return None


def _ed25519_verifies(key: ed25519.Ed25519PublicKey, signature: bytes, tarball: Path) -> bool:
    # The map is read-only and backed by the page cache, so a 200 MB tarball costs no
    # anonymous memory, where read_bytes() would allocate it all. The tarball is in the
    # supervisor's own cache folder; truncating it while mapped would raise SIGBUS.
    with tarball.open("rb") as source:
        if source.seek(0, 2) == 0:
            # mmap cannot map an empty file.
            return _ed25519_verifies_message(key, signature, b"")
        with mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _ed25519_verifies_message(key, signature, mapped)


def _ed25519_verifies_message(
    key: ed25519.Ed25519PublicKey, signature: bytes, message: bytes | mmap.mmap
) -> bool:
    try:
        # cryptography 44 reads any buffer, although its stubs ask for bytes.
        key.verify(signature, message)  # type: ignore[arg-type]
    except InvalidSignature:
        return False
    return True


def _verify_bundle(
    policy: SignaturePolicy, bundle: dict[str, Any] | str, *, digest: bytes, tarball: Path
) -> Verified:
    document, text = _parse_bundle(bundle)
    signed = document.message_signature
    if signed is None:
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            "bundle contains a DSSE envelope (an attestation), not a message signature; sign "
            "the tarball with `cosign sign-blob --bundle`",
        )
    stated = signed.message_digest
    if stated is not None and stated.algorithm != HashAlgorithm.SHA2_256:
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            f"bundle digest algorithm {stated.algorithm.value} is not supported; sign with "
            "SHA2_256",
        )
    stated_digest = stated.digest if stated is not None else digest

    if document.verification_material.public_key is not None:
        return _verify_key_bundle(
            policy, signed.signature, digest=digest, stated_digest=stated_digest, tarball=tarball
        )
    return _verify_sigstore_bundle(policy, text, digest=digest, stated_digest=stated_digest)


def _parse_bundle(bundle: dict[str, Any] | str) -> tuple[bundle_v1.Bundle, str]:
    """Validate the bundle's structure and return it with its JSON text.

    Messages name the failing field but never echo its value.
    """
    if isinstance(bundle, str):
        try:
            bundle = json.loads(bundle)
        except json.JSONDecodeError as exc:
            raise ImageRejected(
                FailureReason.SIGNATURE_INVALID,
                f"bundle is not valid JSON ({exc.msg} at character {exc.pos}); send the file "
                "written by `cosign sign-blob --bundle` unchanged",
            ) from exc
    if not isinstance(bundle, dict):
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            f"bundle is a JSON {type(bundle).__name__}, expected an object",
        )

    # Protobuf JSON omits empty lists by default, so a key bundle written without a log
    # upload may lack tlogEntries, which the model requires.
    material = bundle.get("verificationMaterial")
    if isinstance(material, dict) and "tlogEntries" not in material:
        bundle = {**bundle, "verificationMaterial": {**material, "tlogEntries": []}}
    text = json.dumps(bundle)
    try:
        # The model is strict, and strict pydantic accepts enum names only from JSON text.
        return bundle_v1.Bundle.model_validate_json(text), text
    except ValidationError as exc:
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            f"bundle is not a valid Sigstore bundle: {_summarize(exc)}",
        ) from exc


def _summarize(exc: ValidationError) -> str:
    # Locations and messages only: pydantic's own text would repeat the input values.
    parts = [
        f"{'.'.join(str(part) for part in error['loc']) or 'document'}: {error['msg']}"
        for error in exc.errors()[:3]
    ]
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _verify_key_bundle(
    policy: SignaturePolicy,
    signature: bytes,
    *,
    digest: bytes,
    stated_digest: bytes,
    tarball: Path,
) -> Verified:
    # The publicKey hint is unauthenticated, so every configured key is tried. Log entries
    # in a key bundle are not checked, because trust comes from the configured key alone.
    _require_keys(policy)
    if stated_digest != digest:
        # Only ECDSA can be checked against the stated digest without the other file.
        if _find_signing_key(policy.keys, signature, digest=stated_digest, tarball=None):
            raise _signed_other_file(stated_digest, digest)
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            f"bundle states digest sha256:{stated_digest.hex()}, not this image's "
            f"sha256:{digest.hex()}, and its signature does not verify with any key given to "
            f"{KEY_OPTION}",
        )
    key = _find_signing_key(policy.keys, signature, digest=digest, tarball=tarball)
    if key is None:
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            f"bundle signature does not verify with any of the {len(policy.keys)} keys given "
            f"to {KEY_OPTION}; sign this exact tarball with one of those keys",
        )
    return Verified(method=VerificationMethod.KEY, key_fingerprint=key_fingerprint(key))


def _signed_other_file(stated_digest: bytes, digest: bytes) -> ImageRejected:
    return ImageRejected(
        FailureReason.SIGNATURE_DIGEST_MISMATCH,
        f"bundle is a valid signature of sha256:{stated_digest.hex()}, not of this image "
        f"sha256:{digest.hex()}; send the bundle made for this tarball",
    )


class _SignerMismatch(VerificationError):
    """The certificate chains to the trusted CA but names another identity or issuer."""


@dataclass(frozen=True)
class _PinnedSigner:
    """sigstore-python verification policy that marks identity failures as _SignerMismatch.

    sigstore-python 4.5.0 checks the policy after the certificate chain and SCT, so a
    mismatch means a genuine certificate for someone else.
    """

    identity: str
    issuer: str

    def verify(self, cert: x509.Certificate) -> None:
        try:
            Identity(identity=self.identity, issuer=self.issuer).verify(cert)
        except (VerificationError, x509.ExtensionNotFound, ValueError) as exc:
            raise _SignerMismatch(str(exc)) from exc


def _verify_sigstore_bundle(
    policy: SignaturePolicy,
    text: str,
    *,
    digest: bytes,
    stated_digest: bytes,
) -> Verified:
    if policy._root is None or policy.identity is None or policy.issuer is None:
        raise ImageRejected(
            FailureReason.SIGNER_NOT_TRUSTED,
            f"bundle carries a Sigstore certificate, but this host trusts no Sigstore signer "
            f"({TRUSTED_ROOT_OPTION}); sign the tarball with a key given to {KEY_OPTION}",
        )
    pinned = _PinnedSigner(policy.identity, policy.issuer)
    try:
        bundle = Bundle.from_json(text)
        # Checked against the digest the bundle states, so that a genuine signature of
        # another file is reported as such below.
        Verifier(trusted_root=policy._root).verify_artifact(
            Hashed(digest=stated_digest, algorithm=HashAlgorithm.SHA2_256), bundle, pinned
        )
    except _SignerMismatch as exc:
        raise ImageRejected(
            FailureReason.SIGNER_NOT_TRUSTED,
            f"bundle certificate is not for {IDENTITY_OPTION} {policy.identity!r} from "
            f"{ISSUER_OPTION} {policy.issuer!r}: {_shorten(exc)}",
        ) from exc
    except CertValidationError as exc:
        raise ImageRejected(
            FailureReason.SIGNER_NOT_TRUSTED,
            f"bundle certificate was not issued by a CA in {TRUSTED_ROOT_OPTION}: {_shorten(exc)}",
        ) from exc
    except (SigstoreError, ValueError, TypeError) as exc:
        # TypeError and ValueError come from well-formed but unusable material, such as a
        # non-ECDSA certificate key or an undecodable certificate.
        raise ImageRejected(
            FailureReason.SIGNATURE_INVALID,
            f"Sigstore bundle verification failed: {_shorten(exc)}",
        ) from exc

    if stated_digest != digest:
        raise _signed_other_file(stated_digest, digest)
    return Verified(
        method=VerificationMethod.SIGSTORE, identity=policy.identity, issuer=policy.issuer
    )


def _shorten(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS] + "..."
