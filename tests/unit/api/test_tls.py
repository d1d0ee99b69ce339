"""Tests for the gateway's TLS context, certificate checks and reloads.

Handshakes run through OpenSSL over memory BIOs, so they exercise the real context without
sockets. tests/integration/test_gateway_tls.py repeats the protocol checks over TCP against
the running gateway.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from services.api.tls import (
    TLS12_CIPHERS,
    CertificateError,
    CertificateReloader,
    create_server_context,
    read_key_pair,
)
from tests.support.certificates import (
    SERVER_NAME,
    CertificateAuthority,
    ServerFiles,
    chain_pem,
    key_pem,
    make_rsa_key,
    replace_file,
    server_files,
)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture
def files(tmp_path: Path, ca: CertificateAuthority) -> ServerFiles:
    return server_files(tmp_path / "tls", ca)


def handshake_serial(server_context: ssl.SSLContext, ca: CertificateAuthority) -> int:
    """Complete a TLS handshake in memory and return the serial of the server's certificate."""
    client_context = ssl.create_default_context(cadata=ca.pem.decode())
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out, server_hostname=SERVER_NAME)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)

    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "the handshake did not finish in 10 rounds"

    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def loaded_reloader(files: ServerFiles, *, interval: float = 3600) -> CertificateReloader:
    reloader = CertificateReloader(
        create_server_context(),
        cert_path=files.cert_path,
        key_path=files.key_path,
        check_interval=interval,
    )
    reloader.load()
    return reloader


def test_context_minimum_version_is_tls12() -> None:
    context = create_server_context()

    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    "option",
    [
        pytest.param(ssl.OP_NO_COMPRESSION, id="no-compression"),
        pytest.param(ssl.OP_NO_RENEGOTIATION, id="no-renegotiation"),
        pytest.param(ssl.OP_CIPHER_SERVER_PREFERENCE, id="server-preference"),
        pytest.param(ssl.OP_NO_TICKET, id="no-tickets"),
    ],
)
def test_context_sets_option(option: ssl.Options) -> None:
    context = create_server_context()

    assert context.options & option == option


def test_context_tls12_suites_are_ecdhe_aead() -> None:
    suites = [s for s in create_server_context().get_ciphers() if s["protocol"] == "TLSv1.2"]

    assert [suite["name"] for suite in suites] == list(TLS12_CIPHERS)
    for suite in suites:
        assert suite["kea"] == "kx-ecdhe", suite["name"]
        assert suite["aead"], suite["name"]


def test_context_tls13_suites_are_aead() -> None:
    suites = [s for s in create_server_context().get_ciphers() if s["protocol"] == "TLSv1.3"]

    assert suites
    for suite in suites:
        assert suite["aead"], suite["name"]


def test_read_key_pair_describes_certificate(files: ServerFiles) -> None:
    pair = read_key_pair(files.cert_path, files.key_path)

    assert pair.info.subject == f"CN={SERVER_NAME}"
    assert pair.info.serial == f"{files.serial:x}"
    assert pair.info.not_after > datetime.now(UTC)


def _missing_cert(files: ServerFiles) -> Path:
    files.cert_path.unlink()
    return files.cert_path


def _missing_key(files: ServerFiles) -> Path:
    files.key_path.unlink()
    return files.key_path


def _unreadable_cert(files: ServerFiles) -> Path:
    # A folder cannot be read as a file, even by root, which file modes would not stop.
    files.cert_path.unlink()
    files.cert_path.mkdir()
    return files.cert_path


def _garbage_cert(files: ServerFiles) -> Path:
    files.cert_path.write_text("not a certificate\n")
    return files.cert_path


def _key_in_cert_file(files: ServerFiles) -> Path:
    files.cert_path.write_bytes(files.key_path.read_bytes())
    return files.cert_path


def _garbage_key(files: ServerFiles) -> Path:
    files.key_path.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    return files.key_path


def _encrypted_key(files: ServerFiles) -> Path:
    key = make_rsa_key()
    files.key_path.write_bytes(key_pem(key, password=b"secret"))
    files.cert_path.write_bytes(chain_pem(files.ca.issue(key), files.ca))
    return files.key_path


def _mismatched_key(files: ServerFiles) -> Path:
    files.key_path.write_bytes(key_pem(make_rsa_key()))
    return files.key_path


def _oversized_cert(files: ServerFiles) -> Path:
    files.cert_path.write_bytes(b"#" * (1024 * 1024 + 1))
    return files.cert_path


def _weak_key(files: ServerFiles) -> Path:
    key = make_rsa_key(1024)
    files.key_path.write_bytes(key_pem(key))
    files.cert_path.write_bytes(chain_pem(files.ca.issue(key), files.ca))
    return files.cert_path


@pytest.mark.parametrize(
    ("break_files", "expected"),
    [
        pytest.param(_missing_cert, "cannot read --tls-cert", id="missing-cert"),
        pytest.param(_missing_key, "cannot read --tls-key", id="missing-key"),
        pytest.param(_unreadable_cert, "cannot read --tls-cert", id="unreadable-cert"),
        pytest.param(_garbage_cert, "contains no valid PEM certificate", id="garbage-cert"),
        pytest.param(_key_in_cert_file, "contains no valid PEM certificate", id="key-as-cert"),
        pytest.param(_garbage_key, "contains no valid PEM private key", id="garbage-key"),
        pytest.param(_encrypted_key, "is encrypted", id="encrypted-key"),
        pytest.param(_mismatched_key, "does not match the certificate", id="mismatched-key"),
        pytest.param(_oversized_cert, "is larger than", id="oversized-cert"),
        pytest.param(_weak_key, "OpenSSL rejected", id="rsa-1024"),
    ],
)
def test_read_key_pair_rejects(
    files: ServerFiles, break_files: Callable[[ServerFiles], Path], expected: str
) -> None:
    culprit = break_files(files)

    with pytest.raises(CertificateError) as error:
        read_key_pair(files.cert_path, files.key_path)

    assert error.value.path == culprit
    assert expected in str(error.value)
    assert repr(str(culprit)) in str(error.value)


def test_loaded_context_serves_certificate(files: ServerFiles, ca: CertificateAuthority) -> None:
    reloader = loaded_reloader(files)

    assert handshake_serial(reloader.context, ca) == files.serial


def test_load_logs_certificate_facts(files: ServerFiles, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="services.api.tls"):
        loaded_reloader(files)

    assert f"serial {files.serial:x}" in caplog.text
    assert f"CN={SERVER_NAME}" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_load_rejects_mismatched_key(files: ServerFiles) -> None:
    _mismatched_key(files)
    reloader = CertificateReloader(
        create_server_context(),
        cert_path=files.cert_path,
        key_path=files.key_path,
        check_interval=3600,
    )

    with pytest.raises(CertificateError, match="does not match"):
        reloader.load()
    assert reloader.info is None


def test_reload_serves_new_certificate(files: ServerFiles, ca: CertificateAuthority) -> None:
    reloader = loaded_reloader(files)
    new_serial = files.install()

    assert reloader.reload("test") is True
    assert handshake_serial(reloader.context, ca) == new_serial
    assert reloader.info is not None
    assert reloader.info.serial == f"{new_serial:x}"


@pytest.mark.parametrize(
    "break_files",
    [
        pytest.param(_missing_key, id="missing-key"),
        pytest.param(_garbage_cert, id="garbage-cert"),
        pytest.param(_encrypted_key, id="encrypted-key"),
        pytest.param(_mismatched_key, id="mismatched-key"),
        pytest.param(_weak_key, id="rsa-1024"),
    ],
)
def test_failed_reload_keeps_old_certificate(
    files: ServerFiles,
    ca: CertificateAuthority,
    break_files: Callable[[ServerFiles], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    reloader = loaded_reloader(files)
    old_serial = files.serial
    culprit = break_files(files)

    with caplog.at_level(logging.ERROR, logger="services.api.tls"):
        assert reloader.reload("SIGHUP") is False

    assert handshake_serial(reloader.context, ca) == old_serial
    assert reloader.info is not None
    assert reloader.info.serial == f"{old_serial:x}"
    assert str(culprit) in caplog.text
    assert f"still serving serial {old_serial:x}" in caplog.text


def test_expired_certificate_loads_with_warning(
    files: ServerFiles, caplog: pytest.LogCaptureFixture
) -> None:
    key = make_rsa_key()
    past = datetime.now(UTC) - timedelta(days=2)
    certificate = files.ca.issue(key, not_before=past, not_after=past + timedelta(days=1))
    replace_file(files.key_path, key_pem(key))
    replace_file(files.cert_path, chain_pem(certificate, files.ca))

    with caplog.at_level(logging.WARNING, logger="services.api.tls"):
        loaded_reloader(files)

    assert "expired at" in caplog.text


async def _wait_for_serial(reloader: CertificateReloader, serial: int, timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if reloader.info is not None and reloader.info.serial == f"{serial:x}":
            return True
        await asyncio.sleep(0.01)
    return False


async def test_watch_reloads_changed_files(files: ServerFiles, ca: CertificateAuthority) -> None:
    reloader = loaded_reloader(files, interval=0.02)
    watcher = asyncio.create_task(reloader.watch())
    try:
        await asyncio.sleep(0.05)
        new_serial = files.install()

        assert await _wait_for_serial(reloader, new_serial, timeout=5)
    finally:
        watcher.cancel()

    assert handshake_serial(reloader.context, ca) == new_serial


async def test_watch_retries_only_after_next_change(
    files: ServerFiles, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    reloader = loaded_reloader(files, interval=0.02)
    old_serial = files.serial
    watcher = asyncio.create_task(reloader.watch())
    try:
        with caplog.at_level(logging.ERROR, logger="services.api.tls"):
            _mismatched_key(files)
            await asyncio.sleep(0.5)
            failures = [
                record
                for record in caplog.records
                if "reload after file change failed" in record.message
            ]

            assert len(failures) == 1
            assert handshake_serial(reloader.context, ca) == old_serial

            new_serial = files.install()
            assert await _wait_for_serial(reloader, new_serial, timeout=5)
    finally:
        watcher.cancel()
