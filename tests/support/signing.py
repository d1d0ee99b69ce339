"""Signing material for tests: cosign-style key signatures and a private Sigstore instance.

cosign is not installed and no test may reach a public Sigstore service, so this module makes
everything itself:

- key pairs and the base64 signature that `cosign sign-blob --key` prints (ECDSA P-256: DER
  signature over the SHA-256 of the file; Ed25519: plain Ed25519 over the whole file);
- the v0.3 bundle that cosign v3 writes for a key (`publicKey.hint`, no log entry);
- `SigstoreInstance`, a test CA, CT log and Rekor log, and the trusted_root.json that lists
  them. They issue a short-lived code-signing certificate with an embedded SCT and log the
  signature as a `hashedrekord` entry with inclusion proof, signed checkpoint and signed entry
  timestamp (SET).

What the Sigstore pieces contain follows what sigstore-python 4.5.0 checks in
`Verifier.verify_artifact`: the chain to a CA in the trusted root at the log's integrated time
(OpenSSL with X509_STRICT), one precertificate SCT signed by a trusted CT log key, key usage
and code-signing EKU, the issuer in extension 1.3.6.1.4.1.57264.1.1 (the one its `Identity`
policy reads), the Merkle inclusion proof, a checkpoint signed by the log key, the SET, and a
log entry body that matches the certificate, signature and digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
TRUSTED_ROOT_MEDIA_TYPE = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"

# Two extensions carry the OIDC issuer, and certificates here have both: 57264.1.1 contains
# the raw UTF-8 bytes (read by sigstore-python 4.5.0's `Identity` policy), 57264.1.8 a DER
# UTF8String.
ISSUER_V1_OID = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
ISSUER_V2_OID = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
# RFC 6962 section 3.3: the SCT list embedded in a certificate.
SCT_LIST_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")

_CHUNK_SIZE = 1024 * 1024
# Entries logged before and after ours, so that the inclusion proof has several levels.
_ENTRIES_BEFORE = 5
_ENTRIES_AFTER = 2


def make_ecdsa_key() -> ec.EllipticCurvePrivateKey:
    """Generate an ECDSA P-256 key, the type `cosign generate-key-pair` makes."""
    return ec.generate_private_key(ec.SECP256R1())


def make_ed25519_key() -> ed25519.Ed25519PrivateKey:
    """Generate an Ed25519 key."""
    return ed25519.Ed25519PrivateKey.generate()


def public_key_der(key: SigningKey | ec.EllipticCurvePublicKey) -> bytes:
    """Return the DER SubjectPublicKeyInfo of `key` (or of its public half)."""
    public = key.public_key() if isinstance(key, SigningKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_public_key(key: SigningKey, path: Path) -> Path:
    """Write the PEM `PUBLIC KEY` of `key` to `path`, the format of `cosign.pub`; return path."""
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.write_bytes(pem)
    return path


def key_fingerprint(key: SigningKey) -> str:
    """Return `sha256:<hex>` of the key's DER SubjectPublicKeyInfo."""
    return "sha256:" + hashlib.sha256(public_key_der(key)).hexdigest()


def file_sha256(path: Path) -> bytes:
    """Hash `path` in chunks and return the raw SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK_SIZE):
            digest.update(chunk)
    return digest.digest()


def file_digest(path: Path) -> str:
    """Return `sha256:<hex>` of `path`, as the supervisor computes it while downloading."""
    return "sha256:" + file_sha256(path).hex()


def _sign_file(path: Path, key: SigningKey) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(path.read_bytes())
    return key.sign(file_sha256(path), ec.ECDSA(Prehashed(hashes.SHA256())))


def sign_blob(path: Path, key: SigningKey) -> str:
    """Return the base64 signature that `cosign sign-blob --key` prints for `path`."""
    return base64.b64encode(_sign_file(path, key)).decode()


def key_bundle(path: Path, key: SigningKey) -> dict[str, Any]:
    """Return the v0.3 bundle that `cosign sign-blob --key --bundle` (cosign v3) writes.

    The hint is base64 of the SHA-256 of the key's DER SubjectPublicKeyInfo, as sigstore-go
    computes it. The bundle has no log entry, as with `--tlog-upload=false`.
    """
    hint = base64.b64encode(hashlib.sha256(public_key_der(key)).digest()).decode()
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": hint}},
        "messageSignature": {
            "messageDigest": {
                "algorithm": "SHA2_256",
                "digest": base64.b64encode(file_sha256(path)).decode(),
            },
            "signature": base64.b64encode(_sign_file(path, key)).decode(),
        },
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _der_octet_string(data: bytes) -> bytes:
    return b"\x04" + _der_length(len(data)) + data


def _der_utf8_string(text: str) -> bytes:
    data = text.encode()
    return b"\x0c" + _der_length(len(data)) + data


def _merkle_leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def _merkle_node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split_point(size: int) -> int:
    """Return the largest power of two smaller than `size` (RFC 6962 section 2.1)."""
    return 1 << ((size - 1).bit_length() - 1)


def _merkle_root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return _merkle_leaf_hash(leaves[0])
    split = _split_point(len(leaves))
    return _merkle_node_hash(_merkle_root(leaves[:split]), _merkle_root(leaves[split:]))


def _merkle_audit_path(index: int, leaves: list[bytes]) -> list[bytes]:
    """Return the RFC 6962 audit path of leaf `index`, lowest level first."""
    if len(leaves) == 1:
        return []
    split = _split_point(len(leaves))
    if index < split:
        return [*_merkle_audit_path(index, leaves[:split]), _merkle_root(leaves[split:])]
    return [*_merkle_audit_path(index - split, leaves[split:]), _merkle_root(leaves[:split])]


def _canonical_json(value: dict[str, Any]) -> bytes:
    # RFC 8785 output for objects of ASCII strings and integers, the only values used here.
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _log_public_key(key: ec.EllipticCurvePrivateKey, since: datetime) -> dict[str, Any]:
    return {
        "rawBytes": _b64(public_key_der(key)),
        "keyDetails": "PKIX_ECDSA_P256_SHA_256",
        "validFor": {"start": since.strftime("%Y-%m-%dT%H:%M:%SZ")},
    }


def _key_id(key: ec.EllipticCurvePrivateKey) -> bytes:
    # RFC 6962 log ID, which sigstore-python also uses for Rekor: SHA-256 of the DER SPKI.
    return hashlib.sha256(public_key_der(key)).digest()


@dataclass
class SigstoreInstance:
    """A private Fulcio-like CA, CT log and Rekor log whose keys live only in this process.

    `write_trusted_root` writes the trusted_root.json that trusts them; `sign` returns a
    certificate bundle that sigstore-python verifies offline against that file.
    """

    name: str = "agent-runner-test"
    ca_key: ec.EllipticCurvePrivateKey = field(default_factory=make_ecdsa_key)
    ct_key: ec.EllipticCurvePrivateKey = field(default_factory=make_ecdsa_key)
    rekor_key: ec.EllipticCurvePrivateKey = field(default_factory=make_ecdsa_key)
    created: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    ca_certificate: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{self.name} CA"),
            ]
        )
        public = self.ca_key.public_key()
        self.ca_certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.created - timedelta(days=1))
            .not_valid_after(self.created + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )

    @property
    def log_url(self) -> str:
        # Written to the trusted root only; sigstore-python verifies bundles without calling it.
        return f"https://rekor.{self.name}.test"

    def trusted_root(self) -> dict[str, Any]:
        """Return the trusted_root.json content that trusts this instance's CA and logs."""
        since = self.created - timedelta(days=1)
        return {
            "mediaType": TRUSTED_ROOT_MEDIA_TYPE,
            "tlogs": [
                {
                    "baseUrl": self.log_url,
                    "hashAlgorithm": "SHA2_256",
                    "publicKey": _log_public_key(self.rekor_key, since),
                    "logId": {"keyId": _b64(_key_id(self.rekor_key))},
                }
            ],
            "certificateAuthorities": [
                {
                    "subject": {"organization": self.name, "commonName": f"{self.name} CA"},
                    "uri": f"https://fulcio.{self.name}.test",
                    "certChain": {
                        "certificates": [{"rawBytes": _b64(self.ca_certificate.public_bytes(_DER))}]
                    },
                    "validFor": {"start": since.strftime("%Y-%m-%dT%H:%M:%SZ")},
                }
            ],
            "ctlogs": [
                {
                    "baseUrl": f"https://ctfe.{self.name}.test",
                    "hashAlgorithm": "SHA2_256",
                    "publicKey": _log_public_key(self.ct_key, since),
                    "logId": {"keyId": _b64(_key_id(self.ct_key))},
                }
            ],
            "timestampAuthorities": [],
        }

    def write_trusted_root(self, path: Path) -> Path:
        """Write `trusted_root()` to `path` and return it."""
        path.write_text(json.dumps(self.trusted_root(), indent=2))
        return path

    def issue_certificate(
        self,
        signer: ec.EllipticCurvePrivateKey,
        *,
        identity: str,
        issuer: str,
        identity_kind: Literal["email", "uri"] = "email",
    ) -> x509.Certificate:
        """Issue a 10-minute code-signing certificate for `signer`, as Fulcio does.

        The subject is empty and the identity is the only SAN, so the SAN is critical
        (RFC 5280 section 4.2.1.6). The embedded SCT is over the precertificate, that is the
        same TBSCertificate without the SCT extension, so the certificate is built twice.
        """
        name: x509.GeneralName = (
            x509.RFC822Name(identity)
            if identity_kind == "email"
            else x509.UniformResourceIdentifier(identity)
        )
        not_before = self.created - timedelta(minutes=2)
        public = signer.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca_certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + timedelta(minutes=10))
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([name]), critical=True)
            .add_extension(
                x509.UnrecognizedExtension(ISSUER_V1_OID, issuer.encode()), critical=False
            )
            .add_extension(
                x509.UnrecognizedExtension(ISSUER_V2_OID, _der_utf8_string(issuer)), critical=False
            )
        )
        precertificate = builder.sign(self.ca_key, hashes.SHA256())
        sct_list = self._sct_list(precertificate.tbs_certificate_bytes, timestamp=not_before)
        certificate = builder.add_extension(
            x509.UnrecognizedExtension(SCT_LIST_OID, _der_octet_string(sct_list)), critical=False
        ).sign(self.ca_key, hashes.SHA256())
        if certificate.tbs_precertificate_bytes != precertificate.tbs_certificate_bytes:
            raise AssertionError("the precertificate differs from the issued certificate")
        return certificate

    def _sct_list(self, tbs_precertificate: bytes, *, timestamp: datetime) -> bytes:
        """Return a TLS-encoded SignedCertificateTimestampList with one v1 precert SCT."""
        milliseconds = int(timestamp.timestamp()) * 1000
        issuer_key_hash = hashlib.sha256(public_key_der(self.ca_key)).digest()
        signed_entry = (
            issuer_key_hash + len(tbs_precertificate).to_bytes(3, "big") + tbs_precertificate
        )
        # RFC 6962 section 3.2: version v1 (0), signature_type certificate_timestamp (0),
        # timestamp, entry_type precert_entry (1), the entry, then empty extensions.
        signed_data = (
            struct.pack("!BBQH", 0, 0, milliseconds, 1) + signed_entry + struct.pack("!H", 0)
        )
        signature = self.ct_key.sign(signed_data, ec.ECDSA(hashes.SHA256()))
        # hash algorithm sha256 (4), signature algorithm ecdsa (3)
        sct = (
            b"\x00"
            + _key_id(self.ct_key)
            + struct.pack("!QH", milliseconds, 0)
            + struct.pack("!BBH", 4, 3, len(signature))
            + signature
        )
        entry = struct.pack("!H", len(sct)) + sct
        return struct.pack("!H", len(entry)) + entry

    def sign(
        self,
        path: Path,
        *,
        identity: str,
        issuer: str,
        identity_kind: Literal["email", "uri"] = "email",
    ) -> dict[str, Any]:
        """Sign `path` as `cosign sign-blob --bundle` does keyless, and return the v0.3 bundle.

        A fresh key gets a certificate for `identity` and `issuer`. Its signature is ECDSA
        P-256 over the file's SHA-256, logged as a hashedrekord 0.0.1 entry.
        """
        signer = make_ecdsa_key()
        certificate = self.issue_certificate(
            signer, identity=identity, issuer=issuer, identity_kind=identity_kind
        )
        digest = file_sha256(path)
        signature = signer.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        return {
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {
                "certificate": {"rawBytes": _b64(certificate.public_bytes(_DER))},
                "tlogEntries": [self._log_entry(certificate, signature, digest)],
            },
            "messageSignature": {
                "messageDigest": {"algorithm": "SHA2_256", "digest": _b64(digest)},
                "signature": _b64(signature),
            },
        }

    def _log_entry(
        self, certificate: x509.Certificate, signature: bytes, digest: bytes
    ) -> dict[str, Any]:
        """Return a Rekor v1 transparency-log entry for the signature, in bundle form."""
        body = _canonical_json(
            {
                "apiVersion": "0.0.1",
                "kind": "hashedrekord",
                "spec": {
                    "data": {"hash": {"algorithm": "sha256", "value": digest.hex()}},
                    "signature": {
                        "content": _b64(signature),
                        "publicKey": {"content": _b64(certificate.public_bytes(_PEM))},
                    },
                },
            }
        )
        leaves = [
            *(f"earlier entry {n}".encode() for n in range(_ENTRIES_BEFORE)),
            body,
            *(f"later entry {n}".encode() for n in range(_ENTRIES_AFTER)),
        ]
        index = _ENTRIES_BEFORE
        root = _merkle_root(leaves)
        log_id = _key_id(self.rekor_key)
        integrated_time = int(certificate.not_valid_before_utc.timestamp()) + 60
        promise = _canonical_json(
            {
                "body": _b64(body),
                "integratedTime": integrated_time,
                "logID": log_id.hex(),
                "logIndex": index,
            }
        )
        return {
            "logIndex": str(index),
            "logId": {"keyId": _b64(log_id)},
            "kindVersion": {"kind": "hashedrekord", "version": "0.0.1"},
            "integratedTime": str(integrated_time),
            "inclusionPromise": {"signedEntryTimestamp": _b64(self._log_sign(promise))},
            "inclusionProof": {
                "logIndex": str(index),
                "rootHash": _b64(root),
                "treeSize": str(len(leaves)),
                "hashes": [_b64(node) for node in _merkle_audit_path(index, leaves)],
                "checkpoint": {"envelope": self._checkpoint(root, len(leaves))},
            },
            "canonicalizedBody": _b64(body),
        }

    def _log_sign(self, data: bytes) -> bytes:
        return self.rekor_key.sign(data, ec.ECDSA(hashes.SHA256()))

    def _checkpoint(self, root: bytes, size: int) -> str:
        """Return a signed note (checkpoint) for the tree, in the format Rekor v1 writes."""
        origin = f"rekor.{self.name}.test - {secrets.randbelow(2**63)}"
        note = f"{origin}\n{size}\n{_b64(root)}\n"
        # A note signature is the first 4 bytes of the key hash followed by the signature.
        signature = _key_id(self.rekor_key)[:4] + self._log_sign(note.encode())
        return f"{note}\n\u2014 rekor.{self.name}.test {_b64(signature)}\n"


_DER = serialization.Encoding.DER
_PEM = serialization.Encoding.PEM
