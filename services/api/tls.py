"""TLS of the gateway: the server SSLContext, certificate loading and reload without restart.

`create_server_context` sets the protocol policy: TLS 1.2 or later, and for TLS 1.2 only
ECDHE key exchange with AES-GCM or ChaCha20-Poly1305, so every session has forward secrecy
and an AEAD cipher. TLS 1.3 suites are all of that kind and keep OpenSSL's defaults.
`CertificateReloader` loads the certificate chain and key into that one context at startup,
on SIGHUP and when the files change. New handshakes use the new pair, and connections that
are already open keep theirs. A pair is checked in full before the live context is touched,
so a broken replacement leaves the previous certificate in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from libs.common.errors import ConfigurationError

logger = logging.getLogger(__name__)

# OpenSSL names of the TLS 1.2 suites allowed, in the server's order of preference: ECDHE
# only (forward secrecy) and AEAD only (no CBC, no RC4 or 3DES). Which of the ECDSA and RSA
# variants apply depends on the certificate's key type.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)
# A certificate chain or a key is a few kilobytes. The limit keeps a wrong path, such as a
# device or a log file, from being read whole into memory.
MAX_PEM_BYTES = 1024 * 1024

FileSignature = tuple[int, int, int, int] | None


class CertificateError(ConfigurationError):
    """A certificate or key file cannot be used; `path` is the file at fault."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class CertificateInfo:
    """The public facts of a loaded certificate, which are safe to log."""

    subject: str
    serial: str
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(cls, certificate: x509.Certificate) -> CertificateInfo:
        """Describe `certificate`, with its serial number in hexadecimal as browsers show it."""
        return cls(
            subject=certificate.subject.rfc4514_string(),
            serial=f"{certificate.serial_number:x}",
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
        )


@dataclass(frozen=True)
class KeyPair:
    """A certificate chain and its private key, read and checked, as PEM bytes."""

    chain_pem: bytes
    key_pem: bytes
    info: CertificateInfo


def create_server_context() -> ssl.SSLContext:
    """Return a server context with the gateway's protocol policy and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # set_ciphers affects TLS 1.2 and earlier only. OpenSSL offers TLS 1.3 whenever the
    # client does, and all TLS 1.3 suites are AEAD with (EC)DHE.
    context.set_ciphers(":".join(TLS12_CIPHERS))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_COMPRESSION
    context.options |= ssl.OP_NO_RENEGOTIATION
    # Session tickets are encrypted with a key that OpenSSL keeps for the life of the process,
    # so whoever obtains it can decrypt every recorded session that was resumed with a
    # ticket. Without tickets, resumption uses the server's session cache, whose entries
    # expire after 300 seconds by default.
    context.options |= ssl.OP_NO_TICKET
    context.set_alpn_protocols(["http/1.1"])
    return context


def read_key_pair(cert_path: Path, key_path: Path) -> KeyPair:
    """Read and check a PEM certificate chain and its private key.

    Raises CertificateError naming the file when it cannot be read, contains no PEM
    certificate or key, the key is encrypted, the key does not belong to the first certificate, or
    OpenSSL rejects the pair (a key too weak for its security level, for example).
    """
    chain_pem = _read_pem(cert_path, option="--tls-cert")
    key_pem = _read_pem(key_path, option="--tls-key")

    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise CertificateError(
            f"--tls-cert {str(cert_path)!r} contains no valid PEM certificate: {exc}",
            path=cert_path,
        ) from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise CertificateError(
            f"--tls-key {str(key_path)!r} is encrypted; the gateway needs an unencrypted key, "
            "which 'openssl pkey -in KEY -out PLAIN' writes",
            path=key_path,
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(
            f"--tls-key {str(key_path)!r} contains no valid PEM private key: {exc}",
            path=key_path,
        ) from exc

    try:
        matches = _public_key_der(chain[0].public_key()) == _public_key_der(key.public_key())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(
            f"--tls-cert {str(cert_path)!r} has a public key of an unsupported type: {exc}",
            path=cert_path,
        ) from exc
    if not matches:
        raise CertificateError(
            f"--tls-key {str(key_path)!r} does not match the certificate in --tls-cert "
            f"{str(cert_path)!r}; the first certificate of the chain must be the one issued "
            "for this key",
            path=key_path,
        )

    pair = KeyPair(chain_pem=chain_pem, key_pem=key_pem, info=CertificateInfo.of(chain[0]))
    # OpenSSL applies checks of its own, such as the minimum key size of its security level,
    # so the pair is loaded into a context configured like the live one first.
    try:
        _load_into(create_server_context(), pair)
    except ssl.SSLError as exc:
        raise CertificateError(
            f"OpenSSL rejected --tls-cert {str(cert_path)!r} with --tls-key "
            f"{str(key_path)!r}: {exc.reason or exc}",
            path=cert_path,
        ) from exc
    return pair


def _read_pem(path: Path, *, option: str) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise CertificateError(
            f"cannot read {option} {str(path)!r}: {exc.strerror or exc}", path=path
        ) from exc
    if len(data) > MAX_PEM_BYTES:
        raise CertificateError(
            f"{option} {str(path)!r} is larger than {MAX_PEM_BYTES} bytes; expected a PEM file",
            path=path,
        )
    return data


def _public_key_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_into(context: ssl.SSLContext, pair: KeyPair) -> None:
    """Load `pair` into `context` from the bytes that were checked.

    `load_cert_chain` accepts only file names, so the bytes go through anonymous in-memory
    files. Reading the configured paths again could load a file that was replaced after the
    check, such as a new chain with the old key in the middle of a renewal.
    """
    with (
        _memory_file("tls-chain", pair.chain_pem) as chain_file,
        _memory_file("tls-key", pair.key_pem) as key_file,
    ):
        context.load_cert_chain(chain_file, key_file, password=_reject_password)


@contextlib.contextmanager
def _memory_file(name: str, data: bytes) -> Iterator[str]:
    descriptor = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        with open(descriptor, "wb", closefd=False) as file:
            file.write(data)
        yield f"/proc/self/fd/{descriptor}"
    finally:
        os.close(descriptor)


def _reject_password() -> bytes:
    # read_key_pair has already rejected encrypted keys; this keeps OpenSSL from ever
    # prompting on a terminal for a password.
    raise ValueError("the gateway does not decrypt private keys")


def _file_signature(path: Path) -> FileSignature:
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


class CertificateReloader:
    """Keeps the live context's certificate in step with the --tls-cert and --tls-key files."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        cert_path: Path,
        key_path: Path,
        check_interval: float,
    ) -> None:
        self.context = context
        self.cert_path = cert_path
        self.key_path = key_path
        self.check_interval = check_interval
        self._pair: KeyPair | None = None
        self._loaded_signature: tuple[FileSignature, FileSignature] | None = None

    @property
    def info(self) -> CertificateInfo | None:
        """The certificate that new handshakes use, or None before the first load."""
        return self._pair.info if self._pair is not None else None

    def load(self) -> CertificateInfo:
        """Load the files for the first time; raises CertificateError naming the bad file."""
        self._loaded_signature = self._signature()
        pair = read_key_pair(self.cert_path, self.key_path)
        _load_into(self.context, pair)
        self._pair = pair
        _log_loaded("loaded", pair.info, self.cert_path)
        return pair.info

    def reload(self, trigger: str) -> bool:
        """Load the files again and return whether the new pair is now in use.

        On any failure the previous pair stays in use, and the error is logged with the file
        at fault. `trigger` names the cause in the log, such as "SIGHUP".
        """
        self._loaded_signature = self._signature()
        previous = self._pair
        try:
            pair = read_key_pair(self.cert_path, self.key_path)
        except CertificateError as exc:
            logger.error(
                "TLS certificate reload after %s failed, still serving serial %s: %s",
                trigger,
                previous.info.serial if previous else None,
                exc,
            )
            return False

        try:
            _load_into(self.context, pair)
        except (OSError, ValueError) as exc:
            # The same bytes loaded into a scratch context a moment ago, so this is unexpected.
            # Loading the previous pair again repairs the context, which OpenSSL may have left
            # with the new certificate but without a key.
            logger.error("TLS certificate reload after %s failed: %s", trigger, exc)
            if previous is not None:
                self._restore(previous)
            return False
        self._pair = pair
        _log_loaded(f"reloaded after {trigger}", pair.info, self.cert_path)
        return True

    def _restore(self, previous: KeyPair) -> None:
        try:
            _load_into(self.context, previous)
        except (OSError, ValueError) as exc:
            logger.critical(
                "cannot load TLS certificate serial %s again, so new handshakes may fail until "
                "a reload succeeds: %s",
                previous.info.serial,
                exc,
            )

    def reload_on_signal(self) -> None:
        """Reload after SIGHUP; suits `loop.add_signal_handler`."""
        self.reload("SIGHUP")

    async def watch(self) -> None:
        """Reload when the files change; checks every `check_interval` seconds until cancelled.

        A change is loaded only once the files look the same at two checks in a row, so a
        renewal that replaces the chain and the key one after the other is loaded once,
        complete. A failed attempt is not repeated until the files change again.
        """
        previous = self._signature()
        while True:
            await asyncio.sleep(self.check_interval)
            current = self._signature()
            if current != self._loaded_signature and current == previous:
                self.reload("file change")
            previous = current

    def _signature(self) -> tuple[FileSignature, FileSignature]:
        return (_file_signature(self.cert_path), _file_signature(self.key_path))


def _log_loaded(event: str, info: CertificateInfo, cert_path: Path) -> None:
    logger.info(
        "TLS certificate %s from %s: subject %s, serial %s, valid from %s until %s",
        event,
        cert_path,
        info.subject,
        info.serial,
        info.not_before.isoformat(),
        info.not_after.isoformat(),
    )
    now = datetime.now(UTC)
    if info.not_after <= now:
        logger.warning(
            "TLS certificate serial %s from %s expired at %s; clients will reject it",
            info.serial,
            cert_path,
            info.not_after.isoformat(),
        )
    elif info.not_before > now:
        logger.warning(
            "TLS certificate serial %s from %s is not valid before %s; clients will reject it",
            info.serial,
            cert_path,
            info.not_before.isoformat(),
        )
