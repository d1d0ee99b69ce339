"""Tests for trusted image sources, address checks and redirects in the image download.

HTTP and HTTPS servers run in threads of the test process on 127.0.0.1. Loopback addresses are
denied unless a trusted source names them, so each test that expects a download lists its
server's origin as `http://127.0.0.1:<port>/...`. Where a test must show that nothing
connected, the target is a bare listening socket: the kernel queues a connection to it even
though nobody accepts, so a non-blocking accept() afterwards tells whether one arrived.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.supervisor.download import (
    DownloadLimits,
    Resolver,
    connect_checked,
    download_image,
    resolve_host,
)
from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.image_sources import IPAddress, parse_trusted_source, parse_url

PAYLOAD = b"image tarball " * 4096
PAYLOAD_DIGEST = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
LOOPBACK = ipaddress.ip_address("127.0.0.1")


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Requests:
    """Requests that a test server received: path and Host header, and TLS server names."""

    seen: list[tuple[str, str]] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]


def make_handler(requests: Requests) -> type[BaseHTTPRequestHandler]:
    """Return a handler that serves PAYLOAD under /agents/ and redirects on request.

    `/agents/go?to=URL&status=N` responds with HTTP N (default 302) and `Location: URL`, and
    `/agents/loop/N` redirects to `/agents/loop/N+1` without end.
    """

    class Handler(BaseHTTPRequestHandler):
        timeout = 5

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            requests.seen.append((self.path, self.headers.get("Host", "")))
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            if parts.path in ("/agents/agent.tar", "/secret/agent.tar"):
                self.send_body(200, PAYLOAD)
            elif parts.path == "/agents/go":
                self.redirect(query["to"][0], int(query.get("status", ["302"])[0]))
            elif parts.path.startswith("/agents/loop/"):
                step = int(parts.path.rsplit("/", 1)[1])
                self.redirect(f"/agents/loop/{step + 1}", 302)
            elif parts.path == "/agents/escape":
                self.redirect("../secret/agent.tar", 302)
            elif parts.path == "/agents/no-location":
                self.send_body(302, b"")
            else:
                self.send_body(404, b"")

        def redirect(self, location: str, status: int) -> None:
            self.send_response(status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def send_body(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@dataclass
class Server:
    """A running test server: its base URL, port and the requests it received."""

    url: str
    port: int
    requests: Requests


@contextlib.contextmanager
def running_server(
    *, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> Iterator[Server]:
    requests = Requests()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(requests))
    httpd.daemon_threads = True
    if tls is not None:

        def record_name(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
            requests.server_names.append(name)

        tls.sni_callback = record_name
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    port = int(httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        scheme = "https" if tls is not None else "http"
        yield Server(url=f"{scheme}://{host}:{port}", port=port, requests=requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[Server]:
    with running_server() as running:
        yield running


@pytest.fixture
def second_server() -> Iterator[Server]:
    with running_server() as running:
        yield running


class Listener:
    """A listening socket that nobody serves; it shows whether anything connected to it."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = int(self.socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def connected(self) -> bool:
        """Return whether a connection is waiting; the handshake completes without accept()."""
        self.socket.setblocking(False)
        try:
            connection, _ = self.socket.accept()
        except BlockingIOError:
            return False
        connection.close()
        return True

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    silent = Listener()
    yield silent
    silent.close()


# ---------------------------------------------------------------------------------------------
# Downloads


def limits(
    *sources: str,
    allow_http: bool = True,
    max_redirects: int = 5,
    connect_timeout: float = 2.0,
    read_timeout: float = 5.0,
) -> DownloadLimits:
    return DownloadLimits(
        max_size=1024 * 1024,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        total_timeout=10.0,
        allow_http=allow_http,
        trusted_sources=tuple(
            parse_trusted_source(source, allow_http=allow_http) for source in sources
        ),
        max_redirects=max_redirects,
    )


def rejected(
    url: str,
    directory: Path,
    download_limits: DownloadLimits,
    *,
    resolver: Resolver = resolve_host,
    digest: str = PAYLOAD_DIGEST,
    tls_context: ssl.SSLContext | None = None,
) -> ImageRejected:
    """Run a download that must fail, check that it left no file, and return its error."""
    with pytest.raises(ImageRejected) as error:
        download_image(
            url,
            digest=digest,
            directory=directory,
            limits=download_limits,
            resolver=resolver,
            tls_context=tls_context,
        )
    assert list(directory.iterdir()) == []
    return error.value


def go(server: Server, to: str, *, status: int = 302) -> str:
    """Return a URL on `server` that redirects to `to`."""
    return f"{server.url}/agents/go?to={quote(to, safe='')}&status={status}"


class FixedResolver:
    """A resolver that returns fixed addresses and records each lookup."""

    def __init__(self, addresses: Sequence[IPAddress]) -> None:
        self.addresses = tuple(addresses)
        self.lookups: list[tuple[str, int]] = []

    def __call__(self, name: str, port: int, timeout: float) -> tuple[IPAddress, ...]:
        self.lookups.append((name, port))
        return self.addresses


def test_listener_shows_connection(listener: Listener, tmp_path: Path) -> None:
    # The control for every "not connected" check: a download the sources allow does connect.
    download_limits = limits(f"{listener.url}/agents/", read_timeout=0.2)

    error = rejected(f"{listener.url}/agents/agent.tar", tmp_path, download_limits)

    assert error.reason == FailureReason.DOWNLOAD_TIMEOUT
    assert listener.connected()


def test_trusted_source_served(server: Server, tmp_path: Path) -> None:
    path = download_image(
        f"{server.url}/agents/agent.tar",
        digest=PAYLOAD_DIGEST,
        directory=tmp_path,
        limits=limits(f"{server.url}/agents/"),
    )

    assert path.read_bytes() == PAYLOAD
    assert server.requests.seen == [("/agents/agent.tar", f"127.0.0.1:{server.port}")]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        pytest.param("/other/agent.tar", FailureReason.SOURCE_NOT_TRUSTED, id="other-path"),
        pytest.param("/agents-evil/a.tar", FailureReason.SOURCE_NOT_TRUSTED, id="sibling"),
        pytest.param("/agents", FailureReason.SOURCE_NOT_TRUSTED, id="prefix-without-slash"),
        pytest.param("/agents/%2E%2E/a.tar", FailureReason.URL_NOT_ALLOWED, id="escaped-dots"),
        pytest.param("/agents/..%2Fa.tar", FailureReason.URL_NOT_ALLOWED, id="escaped-slash"),
        pytest.param("/agents/..;/a.tar", FailureReason.URL_NOT_ALLOWED, id="dots-parameter"),
    ],
)
def test_url_outside_source_not_connected(
    path: str, reason: FailureReason, listener: Listener, tmp_path: Path
) -> None:
    error = rejected(f"{listener.url}{path}", tmp_path, limits(f"{listener.url}/agents/"))

    assert error.reason == reason
    assert not listener.connected()


def test_untrusted_origin_named(listener: Listener, server: Server, tmp_path: Path) -> None:
    error = rejected(f"{listener.url}/agents/agent.tar", tmp_path, limits(f"{server.url}/agents/"))

    assert error.reason == FailureReason.SOURCE_NOT_TRUSTED
    assert f"origin {listener.url}" in error.message
    assert f"--trusted-image-sources lists {server.url}/agents/" in error.message
    assert not listener.connected()
    assert server.requests.seen == []


def test_redirect_to_untrusted_port_not_connected(
    server: Server, listener: Listener, tmp_path: Path
) -> None:
    url = go(server, f"{listener.url}/agents/agent.tar")

    error = rejected(url, tmp_path, limits(f"{server.url}/agents/"))

    assert error.reason == FailureReason.SOURCE_NOT_TRUSTED
    assert f"origin {listener.url}" in error.message
    assert f"redirected from {server.url}/agents/go?…" in error.message
    assert not listener.connected()
    assert server.requests.paths == [urlsplit(url).path + "?" + urlsplit(url).query]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_within_source_followed(status: int, server: Server, tmp_path: Path) -> None:
    url = go(server, f"{server.url}/agents/agent.tar", status=status)

    path = download_image(
        url, digest=PAYLOAD_DIGEST, directory=tmp_path, limits=limits(f"{server.url}/agents/")
    )

    assert path.read_bytes() == PAYLOAD
    assert server.requests.paths[1:] == ["/agents/agent.tar"]


def test_relative_redirect_followed(server: Server, tmp_path: Path) -> None:
    url = go(server, "agent.tar")

    path = download_image(
        url, digest=PAYLOAD_DIGEST, directory=tmp_path, limits=limits(f"{server.url}/agents/")
    )

    assert path.read_bytes() == PAYLOAD
    assert server.requests.paths[1:] == ["/agents/agent.tar"]


def test_redirect_to_second_source_followed(
    server: Server, second_server: Server, tmp_path: Path
) -> None:
    url = go(server, f"{second_server.url}/agents/agent.tar")
    both = limits(f"{server.url}/agents/", f"{second_server.url}/agents/")

    path = download_image(url, digest=PAYLOAD_DIGEST, directory=tmp_path, limits=both)

    assert path.read_bytes() == PAYLOAD
    assert second_server.requests.seen == [("/agents/agent.tar", f"127.0.0.1:{second_server.port}")]


def test_redirect_out_of_prefix_refused(server: Server, tmp_path: Path) -> None:
    error = rejected(f"{server.url}/agents/escape", tmp_path, limits(f"{server.url}/agents/"))

    assert error.reason == FailureReason.SOURCE_NOT_TRUSTED
    assert f"{server.url}/secret/agent.tar" in error.message
    assert server.requests.paths == ["/agents/escape"]


@pytest.mark.parametrize(("max_redirects", "requests"), [(0, 1), (2, 3)])
def test_too_many_redirects(
    max_redirects: int, requests: int, server: Server, tmp_path: Path
) -> None:
    download_limits = limits(f"{server.url}/agents/", max_redirects=max_redirects)

    error = rejected(f"{server.url}/agents/loop/0", tmp_path, download_limits)

    assert error.reason == FailureReason.TOO_MANY_REDIRECTS
    assert f"at most {max_redirects} are followed (--image-max-redirects)" in error.message
    assert len(server.requests.seen) == requests


def test_redirect_without_location_rejected(server: Server, tmp_path: Path) -> None:
    error = rejected(f"{server.url}/agents/no-location", tmp_path, limits(f"{server.url}/"))

    assert error.reason == FailureReason.DOWNLOAD_HTTP_STATUS
    assert "without a Location header" in error.message


def test_redirect_with_credentials_rejected(
    server: Server, listener: Listener, tmp_path: Path
) -> None:
    target = f"http://user:hunter2@127.0.0.1:{listener.port}/agents/agent.tar"
    both = limits(f"{server.url}/agents/", f"{listener.url}/agents/")

    error = rejected(go(server, target), tmp_path, both)

    assert error.reason == FailureReason.URL_NOT_ALLOWED
    assert "credentials" in error.message
    assert "hunter2" not in str(error)
    assert not listener.connected()


@pytest.mark.parametrize(
    "target", ["ftp://127.0.0.1/agents/agent.tar", "file:///etc/passwd", "gopher://x/"]
)
def test_redirect_to_other_scheme_rejected(target: str, server: Server, tmp_path: Path) -> None:
    error = rejected(go(server, target), tmp_path, limits(f"{server.url}/agents/"))

    assert error.reason == FailureReason.URL_NOT_ALLOWED
    assert f"redirect from {server.url}/agents/go?…" in error.message


def test_redirect_digest_checked(server: Server, tmp_path: Path) -> None:
    url = go(server, "agent.tar")

    error = rejected(url, tmp_path, limits(f"{server.url}/agents/"), digest="sha256:" + "0" * 64)

    assert error.reason == FailureReason.DIGEST_MISMATCH
    assert PAYLOAD_DIGEST in error.message


def test_url_with_credentials_not_connected(listener: Listener, tmp_path: Path) -> None:
    url = f"http://user:hunter2@127.0.0.1:{listener.port}/agents/agent.tar"

    error = rejected(url, tmp_path, limits(f"{listener.url}/agents/"))

    assert error.reason == FailureReason.URL_NOT_ALLOWED
    assert "hunter2" not in str(error)
    assert not listener.connected()


def test_http_in_production_not_connected(listener: Listener, tmp_path: Path) -> None:
    error = rejected(f"{listener.url}/agents/agent.tar", tmp_path, limits(allow_http=False))

    assert error.reason == FailureReason.URL_NOT_ALLOWED
    assert "development profile" in error.message
    assert not listener.connected()


@pytest.mark.parametrize(
    ("sources", "reason"),
    [
        pytest.param((), FailureReason.SOURCE_ADDRESS_DENIED, id="no-sources"),
        pytest.param(
            ("http://127.0.0.1/",), FailureReason.SOURCE_NOT_TRUSTED, id="only-other-port"
        ),
        pytest.param(
            ("http://localhost/",), FailureReason.SOURCE_NOT_TRUSTED, id="only-name-source"
        ),
    ],
)
def test_loopback_without_named_source_not_connected(
    sources: tuple[str, ...], reason: FailureReason, listener: Listener, tmp_path: Path
) -> None:
    error = rejected(f"{listener.url}/agents/agent.tar", tmp_path, limits(*sources))

    assert error.reason == reason
    assert not listener.connected()


def test_loopback_denial_names_address_and_class(listener: Listener, tmp_path: Path) -> None:
    error = rejected(f"{listener.url}/agents/agent.tar", tmp_path, limits())

    assert error.reason == FailureReason.SOURCE_ADDRESS_DENIED
    assert "127.0.0.1 is denied as address_loopback" in error.message
    assert not listener.connected()


INTERNAL_ANSWERS = [
    pytest.param(["127.0.0.1"], "address_loopback", id="loopback"),
    pytest.param(["::1"], "address_loopback", id="loopback-v6"),
    pytest.param(["169.254.42.42"], "address_link_local", id="link-local"),
    pytest.param(["10.0.0.1"], "address_private", id="private"),
    pytest.param(["203.0.113.10", "127.0.0.1"], "address_loopback", id="one-of-two"),
]


@pytest.mark.parametrize("named_source", [False, True], ids=["no-sources", "name-source"])
@pytest.mark.parametrize(("answer", "reason_class"), INTERNAL_ANSWERS)
def test_name_resolving_to_internal_not_connected(
    answer: list[str],
    reason_class: str,
    named_source: bool,
    listener: Listener,
    tmp_path: Path,
) -> None:
    resolver = FixedResolver([ipaddress.ip_address(text) for text in answer])
    sources = (f"http://images.test:{listener.port}/agents/",) if named_source else ()

    error = rejected(
        f"http://images.test:{listener.port}/agents/agent.tar",
        tmp_path,
        limits(*sources),
        resolver=resolver,
    )

    assert error.reason == FailureReason.SOURCE_ADDRESS_DENIED
    assert f"host images.test of http://images.test:{listener.port} resolves to" in error.message
    assert reason_class in error.message
    assert resolver.lookups == [("images.test", listener.port)]
    assert not listener.connected()


def test_redirect_hop_checks_addresses(server: Server, listener: Listener, tmp_path: Path) -> None:
    resolver = FixedResolver([LOOPBACK])
    url = go(server, f"http://images.test:{listener.port}/agents/agent.tar")
    download_limits = limits(f"{server.url}/agents/", f"http://images.test:{listener.port}/")

    error = rejected(url, tmp_path, download_limits, resolver=resolver)

    assert error.reason == FailureReason.SOURCE_ADDRESS_DENIED
    assert f"redirected from {server.url}/agents/go?…" in error.message
    assert resolver.lookups == [("images.test", listener.port)]
    assert len(server.requests.seen) == 1
    assert not listener.connected()


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        pytest.param(OSError("Name or service not known"), FailureReason.DOWNLOAD_FAILED, id="nx"),
        pytest.param(TimeoutError("no answer"), FailureReason.DOWNLOAD_TIMEOUT, id="timeout"),
    ],
)
def test_resolver_failure_rejected(failure: OSError, reason: FailureReason, tmp_path: Path) -> None:
    def failing(name: str, port: int, timeout: float) -> tuple[IPAddress, ...]:
        raise failure

    error = rejected("https://images.test/agents/agent.tar", tmp_path, limits(), resolver=failing)

    assert error.reason == reason
    assert "images.test" in error.message


def test_empty_resolution_rejected(tmp_path: Path) -> None:
    resolver = FixedResolver([])

    error = rejected("https://images.test/a.tar", tmp_path, limits(), resolver=resolver)

    assert error.reason == FailureReason.DOWNLOAD_FAILED
    assert "no address" in error.message


def test_resolver_gets_connect_timeout(tmp_path: Path) -> None:
    timeouts: list[float] = []

    def recording(name: str, port: int, timeout: float) -> tuple[IPAddress, ...]:
        timeouts.append(timeout)
        return (LOOPBACK,)

    rejected("https://images.test/a.tar", tmp_path, limits(connect_timeout=1.5), resolver=recording)

    assert timeouts == [1.5]


def test_system_resolver_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def stuck(*args: object, **kwargs: object) -> list[object]:
        release.wait(timeout=10)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    try:
        with pytest.raises(TimeoutError):
            resolve_host("images.test", 443, 0.2)
    finally:
        release.set()


def test_system_resolver_reads_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1%eth0", 443, 0, 2)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.10", 443)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.10", 443)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answers)

    addresses = resolve_host("images.test", 443, 1.0)

    assert addresses == (ipaddress.ip_address("fe80::1"), ipaddress.ip_address("203.0.113.10"))


def test_system_resolver_raises_lookup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", failing)

    with pytest.raises(OSError, match="Name or service not known"):
        resolve_host("images.test", 443, 1.0)


# ---------------------------------------------------------------------------------------------
# TLS: the connection goes to the checked address, the certificate is verified for the name


@dataclass
class Certificate:
    """A self-signed certificate for the test names and addresses, and TLS contexts for it."""

    server: ssl.SSLContext
    client: ssl.SSLContext


def make_certificate(
    directory: Path, *, names: tuple[str, ...] = (), addresses: tuple[str, ...] = ()
) -> Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "download test server")])
    alternative_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternative_names += [x509.IPAddress(ipaddress.ip_address(text)) for text in addresses]
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    certificate_path = directory / "server-cert.pem"
    key_path = directory / "server-key.pem"
    certificate_path.write_bytes(certificate_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certificate_path, key_path)
    client = ssl.create_default_context(cadata=certificate_pem.decode())
    return Certificate(server=server, client=client)


@pytest.fixture
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


def open_checked(
    url: str, addresses: Sequence[IPAddress], certificate: Certificate
) -> Callable[[], int]:
    """Return a function that opens `url` at `addresses` and returns the response status."""

    def run() -> int:
        with connect_checked(
            parse_url(url, allow_http=False),
            addresses,
            limits=limits(allow_http=False),
            tls_context=certificate.client,
        ) as response:
            response.read()
            return response.status_code

    return run


def test_tls_verifies_name_at_checked_address(tls_dir: Path) -> None:
    certificate = make_certificate(tls_dir, names=("images.test",))

    with running_server(tls=certificate.server) as tls_server:
        url = f"https://images.test:{tls_server.port}/agents/agent.tar"
        status = open_checked(url, [LOOPBACK], certificate)()

    assert status == 200
    assert tls_server.requests.server_names == ["images.test"]
    assert tls_server.requests.seen == [("/agents/agent.tar", f"images.test:{tls_server.port}")]


def test_tls_rejects_certificate_for_other_name(tls_dir: Path) -> None:
    certificate = make_certificate(tls_dir, names=("other.test",), addresses=("127.0.0.1",))

    with running_server(tls=certificate.server) as tls_server:
        url = f"https://images.test:{tls_server.port}/agents/agent.tar"
        with pytest.raises(ImageRejected) as error:
            open_checked(url, [LOOPBACK], certificate)()

    assert error.value.reason == FailureReason.DOWNLOAD_FAILED
    assert "CERTIFICATE_VERIFY_FAILED" in error.value.message
    assert tls_server.requests.seen == []


def test_next_checked_address_tried(tls_dir: Path) -> None:
    certificate = make_certificate(tls_dir, names=("images.test",))
    # Nothing listens on 127.0.0.2 at the server's port, so that connection is refused.
    refused = ipaddress.ip_address("127.0.0.2")

    with running_server(tls=certificate.server) as tls_server:
        url = f"https://images.test:{tls_server.port}/agents/agent.tar"
        status = open_checked(url, [refused, LOOPBACK], certificate)()
        with pytest.raises(ImageRejected) as error:
            open_checked(url, [refused], certificate)()

    assert status == 200
    assert error.value.reason == FailureReason.DOWNLOAD_FAILED
    assert "127.0.0.2" in error.value.message


def test_https_ip_literal_source_served(tls_dir: Path, tmp_path: Path) -> None:
    certificate = make_certificate(tls_dir, addresses=("127.0.0.1",))

    with running_server(tls=certificate.server) as tls_server:
        path = download_image(
            f"{tls_server.url}/agents/agent.tar",
            digest=PAYLOAD_DIGEST,
            directory=tmp_path,
            limits=limits(f"{tls_server.url}/agents/", allow_http=False),
            tls_context=certificate.client,
        )

    assert path.read_bytes() == PAYLOAD
    assert tls_server.requests.server_names == [None]


def test_redirect_from_https_to_http_refused(
    tls_dir: Path, tmp_path: Path, listener: Listener
) -> None:
    certificate = make_certificate(tls_dir, addresses=("127.0.0.1",))

    with running_server(tls=certificate.server) as tls_server:
        error = rejected(
            go(tls_server, f"{listener.url}/agents/agent.tar"),
            tmp_path,
            limits(f"{tls_server.url}/agents/", allow_http=False),
            tls_context=certificate.client,
        )

    assert error.reason == FailureReason.URL_NOT_ALLOWED
    assert "scheme 'http'" in error.message
    assert not listener.connected()
