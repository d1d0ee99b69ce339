"""A test CA and the server certificates it issues, made with `cryptography`.

Server keys are RSA by default, so the TLS tests can offer RSA key exchange suites that the
certificate would allow and show that the gateway's policy rejects them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

SERVER_NAME = "gateway.test"


def make_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """Generate an RSA key of `bits` bits."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@dataclass
class CertificateAuthority:
    """A self-signed CA that issues server certificates."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, name: str = "Agent Runner Test CA") -> CertificateAuthority:
        """Make a new CA with an ECDSA P-256 key, valid from an hour ago for a day."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, certificate=certificate)

    @property
    def pem(self) -> bytes:
        """The CA certificate in PEM, for a client's trust store."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        """Write the CA certificate to `path` and return the path."""
        path.write_bytes(self.pem)
        return path

    def issue(
        self,
        key: PrivateKey,
        *,
        name: str = SERVER_NAME,
        serial: int | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> x509.Certificate:
        """Issue a server certificate for `name` and 127.0.0.1 to `key`."""
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(hours=1))
            .not_valid_after(not_after or now + timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(name), x509.IPAddress(IPv4Address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


def key_pem(key: PrivateKey, *, password: bytes | None = None) -> bytes:
    """Return `key` as PKCS#8 PEM, encrypted when `password` is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def chain_pem(certificate: x509.Certificate, ca: CertificateAuthority) -> bytes:
    """Return the server certificate followed by the CA certificate, as fullchain.pem has it."""
    return certificate.public_bytes(serialization.Encoding.PEM) + ca.pem


def replace_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` by rename, the way certbot and most deploy tools do."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(data)
    os.chmod(temporary, 0o600)
    temporary.replace(path)


@dataclass
class ServerFiles:
    """The --tls-cert and --tls-key files of one gateway, and what they contain now."""

    ca: CertificateAuthority
    cert_path: Path
    key_path: Path
    serial: int = 0

    def install(self, key: PrivateKey | None = None, *, serial: int | None = None) -> int:
        """Issue a certificate to `key` (default: a new RSA key), write both files.

        Returns the new certificate's serial number.
        """
        key = key or make_rsa_key()
        certificate = self.ca.issue(key, serial=serial)
        replace_file(self.key_path, key_pem(key))
        replace_file(self.cert_path, chain_pem(certificate, self.ca))
        self.serial = certificate.serial_number
        return self.serial


def server_files(folder: Path, ca: CertificateAuthority) -> ServerFiles:
    """Write a fresh RSA certificate and key to `folder` and return their description."""
    folder.mkdir(parents=True, exist_ok=True)
    files = ServerFiles(ca=ca, cert_path=folder / "fullchain.pem", key_path=folder / "privkey.pem")
    files.install()
    return files
