"""TLS of the real gateway: protocol and suite policy, certificate reload, the redirect port.

Each gateway is the `agent-runner-api` entry point in a subprocess, against a nats-server of
this module's own and the Redis of scripts/deps.sh, with certificates that a test CA issues
(tests/support/certificates.py). Clients connect to 127.0.0.1 over TCP. A permissive TLS
server with the same certificate completes the handshake with each legacy client first. That
shows the client really offers what the gateway then rejects, so each rejection comes from
the gateway's policy and not from the client or the certificate.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.support.certificates import (
    SERVER_NAME,
    CertificateAuthority,
    ServerFiles,
    key_pem,
    make_rsa_key,
    server_files,
)
from tests.support.stack import VENV_BIN, Stack, free_port

pytestmark = pytest.mark.integration

START_TIMEOUT = 30.0
RELOAD_TIMEOUT = 20.0


@dataclass
class Gateway:
    """One running `agent-runner-api` process."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    api_key: str
    redirect_port: int | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, *, timeout: float = RELOAD_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            assert self.process.poll() is None, self.log_text()[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"gateway did not log {text!r} within {timeout:g} s")

    def stop(self) -> int:
        """Send SIGTERM, wait for the exit and return its status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A nats-server with JetStream for this module's gateways; nothing else of a stack runs."""
    stack = Stack(workdir=tmp_path_factory.mktemp("tls-nats"), netguard=False)
    stack.start_nats()
    try:
        yield stack
    finally:
        stack.stop_service("nats")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture
def files(tmp_path: Path, ca: CertificateAuthority) -> ServerFiles:
    return server_files(tmp_path / "tls", ca)


def create_key_file(path: Path) -> str:
    return subprocess.run(
        [VENV_BIN / "agent-runner", "keys", "create", "--file", path, "--id", "tests"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def run_gateway(
    args: list[str], workdir: Path, *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a gateway expected to stop at startup; return its exit status and output."""
    key_file = workdir / "api-keys"
    if not key_file.exists():
        create_key_file(key_file)
    return subprocess.run(
        [VENV_BIN / "agent-runner-api", f"--api-keys-file={key_file}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@contextlib.contextmanager
def running_gateway(
    nats: Stack,
    workdir: Path,
    args: list[str],
    *,
    profile: str = "production",
    tls: ServerFiles | None = None,
) -> Iterator[Gateway]:
    """Start a gateway, wait until /healthz responds over HTTPS (or HTTP without `tls`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    key_file = workdir / "api-keys"
    api_key = create_key_file(key_file)

    log = workdir / "api.log"
    env = nats.env() | {"AGENT_RUNNER_PROFILE": profile}
    tls_args = [] if tls is None else [f"--tls-cert={tls.cert_path}", f"--tls-key={tls.key_path}"]
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                VENV_BIN / "agent-runner-api",
                f"--listen-port={port}",
                f"--api-keys-file={key_file}",
                *tls_args,
                *args,
            ],
            env=env,
            stdout=output,
            stderr=output,
        )

    redirect_port = next(
        (int(a.split("=", 1)[1]) for a in args if a.startswith("--http-redirect-port=")), None
    )
    gateway = Gateway(
        process=process, port=port, log=log, api_key=api_key, redirect_port=redirect_port
    )
    try:
        wait_until_healthy(gateway, tls.ca if tls else None)
        yield gateway
    finally:
        gateway.stop()


def wait_until_healthy(gateway: Gateway, ca: CertificateAuthority | None) -> None:
    scheme = "https" if ca else "http"
    verify: ssl.SSLContext | bool = client_context(ca) if ca else False
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert gateway.process.poll() is None, gateway.log_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            url = f"{scheme}://127.0.0.1:{gateway.port}/healthz"
            if httpx.get(url, verify=verify, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"gateway did not respond within {START_TIMEOUT:g} s")


def client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    """Return a client context with Python's defaults that trusts the test CA."""
    return ssl.create_default_context(cadata=ca.pem.decode())


def legacy_client(
    ca: CertificateAuthority, version: ssl.TLSVersion, ciphers: str
) -> ssl.SSLContext:
    """Return a client that offers only `version` and `ciphers`, at OpenSSL security level 0.

    At the default level OpenSSL 3 does not offer TLS 1.0 or 1.1, or some old suites, at
    all, and the client would fail before the server could reject anything.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca.pem.decode())
    context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    with warnings.catch_warnings():
        # Python 3.11 deprecates TLSVersion.TLSv1 and TLSv1_1, which these tests need.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    return context


@dataclass(frozen=True)
class Handshake:
    version: str | None
    cipher: str
    serial: int
    compression: str | None


def handshake(port: int, context: ssl.SSLContext) -> Handshake:
    """Connect to 127.0.0.1:`port`, complete a TLS handshake and describe it."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        cipher = tls.cipher()
        assert cipher is not None
        return Handshake(
            version=tls.version(),
            cipher=cipher[0],
            serial=x509.load_der_x509_certificate(der).serial_number,
            compression=tls.compression(),
        )


def assert_server_rejects(port: int, context: ssl.SSLContext) -> None:
    """Assert that the server at `port` ends the handshake that `context` starts.

    uvloop 0.23, the gateway's event loop, closes the connection after a failed server
    handshake without sending the alert that OpenSSL prepared, so the client reads end of file
    where an alert would be. A client that cannot offer anything fails with a different error,
    such as NO_PROTOCOLS_AVAILABLE, before it sends a byte.
    """
    with pytest.raises(ssl.SSLError) as error:
        handshake(port, context)
    rejected_without_alert = isinstance(error.value, ssl.SSLZeroReturnError | ssl.SSLEOFError)
    rejected_with_alert = "ALERT" in (error.value.reason or "")
    assert rejected_without_alert or rejected_with_alert, error.value


@contextlib.contextmanager
def permissive_server(files: ServerFiles) -> Iterator[int]:
    """Serve TLS 1.0 and later with every suite OpenSSL has, with the gateway's certificate.

    It shows that a legacy client can complete a handshake with that certificate when the
    server allows it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.load_cert_chain(files.cert_path, files.key_path)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection, contextlib.suppress(OSError):
                connection.settimeout(5)
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def module_files(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> ServerFiles:
    return server_files(tmp_path_factory.mktemp("tls-files"), ca)


@pytest.fixture(scope="module")
def tls_gateway(
    nats: Stack, tmp_path_factory: pytest.TempPathFactory, module_files: ServerFiles
) -> Iterator[Gateway]:
    """A production gateway with TLS and a redirect port, shared by the protocol tests."""
    workdir = tmp_path_factory.mktemp("tls-gateway")
    args = [f"--http-redirect-port={free_port()}", f"--public-host={SERVER_NAME}"]
    with running_gateway(nats, workdir, args, tls=module_files) as gateway:
        yield gateway


# Protocol versions


@pytest.mark.parametrize(
    ("version", "name"),
    [
        pytest.param(ssl.TLSVersion.TLSv1, "TLSv1", id="tls1.0"),
        pytest.param(ssl.TLSVersion.TLSv1_1, "TLSv1.1", id="tls1.1"),
    ],
)
def test_old_tls_versions_rejected(
    tls_gateway: Gateway,
    module_files: ServerFiles,
    ca: CertificateAuthority,
    version: ssl.TLSVersion,
    name: str,
) -> None:
    client = legacy_client(ca, version, "ALL")
    with permissive_server(module_files) as control_port:
        assert handshake(control_port, client).version == name

    assert_server_rejects(tls_gateway.port, client)
    assert tls_gateway.process.poll() is None


def test_tls13_negotiated_by_default(tls_gateway: Gateway, ca: CertificateAuthority) -> None:
    result = handshake(tls_gateway.port, client_context(ca))

    assert result.version == "TLSv1.3"
    assert result.compression is None


def test_https_healthz_verifies_certificate(tls_gateway: Gateway, ca: CertificateAuthority) -> None:
    response = httpx.get(
        f"https://127.0.0.1:{tls_gateway.port}/healthz", verify=client_context(ca), timeout=10
    )

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_plain_http_on_tls_port_fails(tls_gateway: Gateway) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_gateway.port}/healthz", timeout=5)


# TLS 1.2 cipher suites

WEAK_SUITES = [
    pytest.param("AES128-SHA", True, id="rsa-kx-cbc"),
    pytest.param("AES256-GCM-SHA384", True, id="rsa-kx-gcm"),
    pytest.param("ECDHE-RSA-AES128-SHA", True, id="ecdhe-cbc-sha1"),
    pytest.param("ECDHE-RSA-AES256-SHA384", True, id="ecdhe-cbc-sha384"),
    # The permissive server has no DH parameters, so it cannot show that the client offers it.
    pytest.param("DHE-RSA-AES128-GCM-SHA256", False, id="dhe-gcm"),
    # 3DES is left out: OpenSSL 3 cannot offer it at all, so no client could ask for it.
]


@pytest.mark.parametrize(("suite", "control"), WEAK_SUITES)
def test_weak_tls12_suite_rejected(
    tls_gateway: Gateway,
    module_files: ServerFiles,
    ca: CertificateAuthority,
    suite: str,
    control: bool,
) -> None:
    client = legacy_client(ca, ssl.TLSVersion.TLSv1_2, suite)
    if control:
        with permissive_server(module_files) as control_port:
            assert handshake(control_port, client).cipher == suite

    assert_server_rejects(tls_gateway.port, client)


@pytest.mark.parametrize(
    "suite",
    ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"],
)
def test_allowed_tls12_suite_accepted(
    tls_gateway: Gateway, ca: CertificateAuthority, suite: str
) -> None:
    client = client_context(ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(suite)

    result = handshake(tls_gateway.port, client)

    assert result.version == "TLSv1.2"
    assert result.cipher == suite


def test_server_cipher_order_wins(tls_gateway: Gateway, ca: CertificateAuthority) -> None:
    client = client_context(ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256")

    result = handshake(tls_gateway.port, client)

    assert result.cipher == "ECDHE-RSA-AES128-GCM-SHA256"


# Redirect port


def raw_request(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send `request` as it is and return the status line, headers and body of the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = connection.recv(65536)
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@pytest.mark.parametrize(
    ("request_head", "path"),
    [
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\n", "/healthz", id="healthz"),
        pytest.param(
            b"GET /v1/agents?state=ready&x=%20y HTTP/1.1\r\nHost: gateway.test\r\n",
            "/v1/agents?state=ready&x=%20y",
            id="query",
        ),
        pytest.param(
            b"GET //evil.example/x HTTP/1.1\r\nHost: evil.example\r\n",
            "//evil.example/x",
            id="double-slash",
        ),
        pytest.param(
            b"GET http://evil.example/y?z=1 HTTP/1.1\r\nHost: evil.example\r\n",
            "/y?z=1",
            id="absolute-form",
        ),
        pytest.param(b"OPTIONS * HTTP/1.1\r\nHost: gateway.test\r\n", "/", id="asterisk"),
        pytest.param(
            b"GET /a\\b/%2e%2e/etc HTTP/1.1\r\nHost: gateway.test\r\n",
            "/a%5Cb/%2e%2e/etc",
            id="backslash-dots",
        ),
        pytest.param(
            b"GET /ws HTTP/1.1\r\nHost: gateway.test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n",
            "/ws",
            id="websocket",
        ),
        pytest.param(
            b"DELETE /v1/agents/ag-1 HTTP/1.1\r\nHost: gateway.test\r\nX-API-Key: wrong\r\n",
            "/v1/agents/ag-1",
            id="delete-with-key",
        ),
        pytest.param(
            b"POST /v1/agents HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json"
            b'\r\nContent-Length: 17\r\n\r\n{"image_url": 1}',
            "/v1/agents",
            id="post-body",
        ),
    ],
)
def test_redirect_port_only_redirects(tls_gateway: Gateway, request_head: bytes, path: str) -> None:
    assert tls_gateway.redirect_port is not None
    request = request_head if request_head.endswith(b"}") else request_head + b"\r\n"

    status, headers, body = raw_request(tls_gateway.redirect_port, request)

    assert status == "HTTP/1.1 308 Permanent Redirect"
    assert headers["location"] == f"https://{SERVER_NAME}:{tls_gateway.port}{path}"
    assert headers["content-length"] == "0"
    assert body == b""
    # The gateway app sets X-Request-ID on every response; none means it never ran.
    assert "x-request-id" not in headers
    assert "server" not in headers


def test_redirect_port_with_httpx(tls_gateway: Gateway) -> None:
    assert tls_gateway.redirect_port is not None
    base = f"http://127.0.0.1:{tls_gateway.redirect_port}"

    responses = [
        httpx.get(f"{base}/healthz", timeout=5),
        httpx.post(f"{base}/v1/agents", json={"image_url": "x"}, timeout=5),
        httpx.put(f"{base}/v1/cache/purge?all=1", content=b"x" * 100_000, timeout=5),
    ]

    for response in responses:
        assert response.status_code == 308
        assert response.content == b""
        assert response.headers["location"].startswith(f"https://{SERVER_NAME}:")


def test_redirect_warns_about_clear_text_key(
    nats: Stack, tmp_path: Path, files: ServerFiles
) -> None:
    # A gateway of its own, so no earlier request with a key has used up the warning.
    args = [f"--http-redirect-port={free_port()}", f"--public-host={SERVER_NAME}"]
    with running_gateway(nats, tmp_path / "gateway", args, tls=files) as gateway:
        assert gateway.redirect_port is not None
        assert "API key sent unencrypted" not in gateway.log_text()

        response = httpx.get(
            f"http://127.0.0.1:{gateway.redirect_port}/v1/agents",
            headers={"X-API-Key": gateway.api_key},
            timeout=5,
        )

        assert response.status_code == 308
        gateway.wait_for_log("API key sent unencrypted to the HTTP redirect port by 127.0.0.1")
        assert '"requests_since_last_warning": 1' in gateway.log_text()
        assert gateway.api_key not in gateway.log_text()


# Certificate reload


def current_serial(gateway: Gateway, ca: CertificateAuthority) -> int:
    return handshake(gateway.port, client_context(ca)).serial


def wait_for_serial(gateway: Gateway, ca: CertificateAuthority, serial: int) -> None:
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        if current_serial(gateway, ca) == serial:
            return
        time.sleep(0.1)
    raise AssertionError(f"gateway still serves serial {current_serial(gateway, ca):x}")


def test_changed_files_reloaded_without_restart(
    nats: Stack, tmp_path: Path, files: ServerFiles, ca: CertificateAuthority
) -> None:
    with running_gateway(
        nats, tmp_path / "gateway", ["--tls-check-interval=0.2"], tls=files
    ) as gateway:
        old_serial = files.serial
        with (
            socket.create_connection(("127.0.0.1", gateway.port)) as raw,
            client_context(ca).wrap_socket(raw, server_hostname=SERVER_NAME) as open_connection,
        ):
            new_serial = files.install()

            wait_for_serial(gateway, ca, new_serial)

            der = open_connection.getpeercert(binary_form=True)
            assert der is not None
            assert x509.load_der_x509_certificate(der).serial_number == old_serial
        gateway.wait_for_log(f"reloaded after file change from {files.cert_path}")
        assert f"serial {new_serial:x}" in gateway.log_text()
        assert "PRIVATE KEY" not in gateway.log_text()
        assert gateway.process.poll() is None
        assert gateway.log_text().count("Started server process") == 1


def test_sighup_reloads_certificate(
    nats: Stack, tmp_path: Path, files: ServerFiles, ca: CertificateAuthority
) -> None:
    # The file watcher checks once an hour here, so only SIGHUP can load the new files.
    with running_gateway(
        nats, tmp_path / "gateway", ["--tls-check-interval=3600"], tls=files
    ) as gateway:
        old_serial = files.serial
        new_serial = files.install()
        time.sleep(1)
        assert current_serial(gateway, ca) == old_serial

        gateway.process.send_signal(signal.SIGHUP)

        wait_for_serial(gateway, ca, new_serial)
        gateway.wait_for_log("reloaded after SIGHUP")
        assert gateway.process.poll() is None


def _mismatched_key(files: ServerFiles) -> Path:
    files.key_path.write_bytes(key_pem(make_rsa_key()))
    return files.key_path


def _garbage_cert(files: ServerFiles) -> Path:
    files.cert_path.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    return files.cert_path


def _missing_key(files: ServerFiles) -> Path:
    files.key_path.unlink()
    return files.key_path


@pytest.mark.parametrize(
    "break_files",
    [
        pytest.param(_mismatched_key, id="mismatched-key"),
        pytest.param(_garbage_cert, id="garbage-cert"),
        pytest.param(_missing_key, id="missing-key"),
    ],
)
@pytest.mark.parametrize("trigger", ["file change", "SIGHUP"])
def test_broken_replacement_keeps_old_certificate(
    nats: Stack,
    tmp_path: Path,
    files: ServerFiles,
    break_files: object,
    trigger: str,
) -> None:
    ca = files.ca
    interval = "0.2" if trigger == "file change" else "3600"
    with running_gateway(
        nats, tmp_path / "gateway", [f"--tls-check-interval={interval}"], tls=files
    ) as gateway:
        old_serial = files.serial
        assert callable(break_files)
        culprit = break_files(files)
        if trigger == "SIGHUP":
            gateway.process.send_signal(signal.SIGHUP)

        gateway.wait_for_log(f"reload after {trigger} failed, still serving serial {old_serial:x}")
        assert str(culprit) in gateway.log_text()
        assert current_serial(gateway, ca) == old_serial
        response = httpx.get(
            f"https://127.0.0.1:{gateway.port}/healthz", verify=client_context(ca), timeout=10
        )
        assert response.status_code == 200

        new_serial = files.install()
        if trigger == "SIGHUP":
            gateway.process.send_signal(signal.SIGHUP)
        wait_for_serial(gateway, ca, new_serial)


# Startup and shutdown


def test_sigterm_stops_gateway_and_redirect(
    nats: Stack, tmp_path: Path, files: ServerFiles
) -> None:
    redirect_port = free_port()
    args = [f"--http-redirect-port={redirect_port}", f"--public-host={SERVER_NAME}"]
    with running_gateway(nats, tmp_path / "gateway", args, tls=files) as gateway:
        status = gateway.stop()

        assert status == -signal.SIGTERM
        assert "gateway stopped" in gateway.log_text()
        assert port_is_closed(gateway.port)
        assert port_is_closed(redirect_port)


@pytest.mark.parametrize("profile", ["production", "development"])
def test_insecure_http_warns_at_start(nats: Stack, tmp_path: Path, profile: str) -> None:
    args = ["--insecure-http"] if profile == "production" else []
    with running_gateway(nats, tmp_path / "gateway", args, profile=profile) as gateway:
        gateway.wait_for_log("serving plain HTTP on 127.0.0.1")
        if profile == "development":
            gateway.wait_for_log("development profile relaxes insecure_http")


def test_production_without_tls_exits(tmp_path: Path, nats: Stack) -> None:
    port = free_port()

    result = run_gateway(
        [f"--listen-port={port}"], tmp_path, env=nats.env() | {"AGENT_RUNNER_PROFILE": "production"}
    )

    assert result.returncode == 2
    assert "no TLS certificate configured" in result.stderr
    assert "--insecure-http" in result.stderr
    assert port_is_closed(port)


def test_mismatched_key_exits(tmp_path: Path, files: ServerFiles, nats: Stack) -> None:
    _mismatched_key(files)
    port = free_port()

    result = run_gateway(
        [f"--listen-port={port}", f"--tls-cert={files.cert_path}", f"--tls-key={files.key_path}"],
        tmp_path,
        env=nats.env() | {"AGENT_RUNNER_PROFILE": "production"},
    )

    assert result.returncode == 2
    assert f"--tls-key {str(files.key_path)!r} does not match the certificate" in result.stderr
    assert port_is_closed(port)


def test_missing_certificate_exits(tmp_path: Path, files: ServerFiles, nats: Stack) -> None:
    files.cert_path.unlink()
    port = free_port()

    result = run_gateway(
        [f"--listen-port={port}", f"--tls-cert={files.cert_path}", f"--tls-key={files.key_path}"],
        tmp_path,
        env=nats.env() | {"AGENT_RUNNER_PROFILE": "production"},
    )

    assert result.returncode == 2
    assert f"cannot read --tls-cert {str(files.cert_path)!r}" in result.stderr
    assert port_is_closed(port)


def test_redirect_port_in_use_exits(tmp_path: Path, files: ServerFiles, nats: Stack) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", 0)) as occupied:
        busy = int(occupied.getsockname()[1])

        result = run_gateway(
            [
                f"--listen-port={port}",
                f"--tls-cert={files.cert_path}",
                f"--tls-key={files.key_path}",
                f"--http-redirect-port={busy}",
                f"--public-host={SERVER_NAME}",
            ],
            tmp_path,
            env=nats.env() | {"AGENT_RUNNER_PROFILE": "production"},
        )

    assert result.returncode == 2
    assert f"--http-redirect-port={busy}: cannot listen" in result.stderr
    assert port_is_closed(port)
