"""Tests for image URL checks and for downloads from a local HTTP server on 127.0.0.1.

The server runs in a thread of the test process and serves one fixed behaviour per path, so
each download failure mode has its own route.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from services.supervisor.download import DownloadLimits, check_image_url, download_image
from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.image_sources import parse_trusted_source

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB
PAYLOAD_DIGEST = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
STREAM_TOTAL = 64 * 1024 * 1024
STREAM_CHUNK = 64 * 1024


@pytest.mark.parametrize(
    ("url", "allow_http"),
    [
        pytest.param("https://127.0.0.1/agent.tar", False, id="https"),
        pytest.param("https://127.0.0.1:8443/a.tar?sig=1", False, id="https-port-query"),
        pytest.param("http://127.0.0.1/agent.tar", True, id="http-allowed"),
        pytest.param("https://127.0.0.1/agent.tar", True, id="https-with-http-allowed"),
    ],
)
def test_url_accepted(url: str, allow_http: bool) -> None:
    check_image_url(url, allow_http=allow_http)


@pytest.mark.parametrize(
    ("url", "allow_http"),
    [
        pytest.param("http://127.0.0.1/agent.tar", False, id="http-not-allowed"),
        pytest.param("ftp://127.0.0.1/agent.tar", True, id="ftp"),
        pytest.param("file:///var/lib/agent.tar", True, id="file"),
        pytest.param("127.0.0.1/agent.tar", True, id="no-scheme"),
        pytest.param("", True, id="empty"),
        pytest.param("https:///agent.tar", False, id="no-host"),
        pytest.param("https://user@127.0.0.1/agent.tar", False, id="user"),
        pytest.param("https://user:pw@127.0.0.1/agent.tar", False, id="user-password"),
        pytest.param("https://:pw@127.0.0.1/agent.tar", False, id="password-only"),
        pytest.param("https://user:pw@/agent.tar", False, id="credentials-no-host"),
    ],
)
def test_url_rejected(url: str, allow_http: bool) -> None:
    with pytest.raises(ImageRejected) as error:
        check_image_url(url, allow_http=allow_http)

    assert error.value.reason == FailureReason.URL_NOT_ALLOWED


def test_http_rejection_names_profile() -> None:
    with pytest.raises(ImageRejected) as error:
        check_image_url("http://127.0.0.1/agent.tar", allow_http=False)

    assert "development profile" in error.value.message


def test_rejected_url_hides_password() -> None:
    with pytest.raises(ImageRejected) as error:
        check_image_url("https://user:hunter2@/agent.tar", allow_http=False)

    assert "hunter2" not in str(error.value)


@dataclass
class ServerLog:
    """What the test server saw: request paths, and bytes of the endless stream it sent."""

    paths: list[str] = field(default_factory=list)
    stream_sent: int = 0
    stream_done: threading.Event = field(default_factory=threading.Event)


def make_handler(log: ServerLog) -> type[BaseHTTPRequestHandler]:
    """Return a request handler class that records into `log`."""

    class Handler(BaseHTTPRequestHandler):
        # Bounds every blocking read and write of a connection.
        timeout = 5

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            log.paths.append(self.path)
            routes: dict[str, Callable[[], None]] = {
                "/agent.tar": self.send_payload,
                "/redirect": self.send_redirect,
                "/missing": lambda: self.send_error(404),
                "/huge-declared": self.send_huge_declared,
                "/stall": self.send_stall,
                "/endless": self.send_endless,
                "/gzip-bomb": self.send_gzip_bomb,
            }
            routes[self.path]()

        def send_payload(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def send_redirect(self) -> None:
            self.send_response(302)
            self.send_header("Location", "/agent.tar")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def send_huge_declared(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.wfile.flush()
            self.wait_for_client_close()

        def send_stall(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.wait_for_client_close()

        def send_endless(self) -> None:
            # No Content-Length: the body ends when the server closes the connection.
            self.send_response(200)
            self.end_headers()
            chunk = b"x" * STREAM_CHUNK
            try:
                while log.stream_sent < STREAM_TOTAL:
                    self.wfile.write(chunk)
                    log.stream_sent += len(chunk)
            except OSError:
                pass
            finally:
                log.stream_done.set()

        def send_gzip_bomb(self) -> None:
            body = gzip.compress(bytes(16 * 1024 * 1024))
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def wait_for_client_close(self) -> None:
            with contextlib.suppress(OSError):
                self.rfile.read(1)

    return Handler


@dataclass
class FileServer:
    """Base URL of the running test server and its log."""

    url: str
    log: ServerLog


@pytest.fixture
def server() -> Iterator[FileServer]:
    log = ServerLog()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(log))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield FileServer(url=f"http://127.0.0.1:{httpd.server_address[1]}", log=log)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def limits(url: str, *, max_size: int = 1024 * 1024, read_timeout: float = 5.0) -> DownloadLimits:
    """Return download limits for the local server, which is plain http on loopback.

    Loopback addresses are denied unless a trusted source names them, so the origin of `url`
    is the one trusted source.
    """
    origin = urlsplit(url)
    return DownloadLimits(
        max_size=max_size,
        connect_timeout=2.0,
        read_timeout=read_timeout,
        total_timeout=10.0,
        allow_http=True,
        trusted_sources=(
            parse_trusted_source(f"{origin.scheme}://{origin.netloc}/", allow_http=True),
        ),
    )


def download_error(
    url: str, directory: Path, *, max_size: int = 1024 * 1024, read_timeout: float = 5.0
) -> ImageRejected:
    """Run a download that must fail and return its error."""
    download_limits = limits(url, max_size=max_size, read_timeout=read_timeout)
    with pytest.raises(ImageRejected) as error:
        download_image(url, digest=PAYLOAD_DIGEST, directory=directory, limits=download_limits)
    return error.value


def test_download_returns_verified_file(server: FileServer, tmp_path: Path) -> None:
    path = download_image(
        f"{server.url}/agent.tar",
        digest=PAYLOAD_DIGEST,
        directory=tmp_path,
        limits=limits(server.url),
    )

    assert path.parent == tmp_path
    assert path.read_bytes() == PAYLOAD


def test_digest_mismatch_removes_file(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(ImageRejected) as error:
        download_image(
            f"{server.url}/agent.tar",
            digest="sha256:" + "0" * 64,
            directory=tmp_path,
            limits=limits(server.url),
        )

    assert error.value.reason == FailureReason.DIGEST_MISMATCH
    assert PAYLOAD_DIGEST in error.value.message
    assert list(tmp_path.iterdir()) == []


def test_oversized_stream_stops_early(server: FileServer, tmp_path: Path) -> None:
    error = download_error(f"{server.url}/endless", tmp_path, max_size=100_000)

    assert server.log.stream_done.wait(timeout=5)
    assert error.reason == FailureReason.DOWNLOAD_TOO_LARGE
    assert list(tmp_path.iterdir()) == []
    # Socket buffers hold a few MiB at most, far from the whole stream.
    assert server.log.stream_sent < STREAM_TOTAL // 2


def test_declared_size_rejected_before_body(server: FileServer, tmp_path: Path) -> None:
    # The server never sends the body; reading it would end in a timeout, not this reason.
    error = download_error(f"{server.url}/huge-declared", tmp_path, read_timeout=2.0)

    assert error.reason == FailureReason.DOWNLOAD_TOO_LARGE
    assert "(--image-max-size)" in error.message
    assert list(tmp_path.iterdir()) == []


def test_content_encoding_rejected(server: FileServer, tmp_path: Path) -> None:
    # 16 MiB of zeros compress to about 16 KiB, so decoding is never attempted.
    error = download_error(f"{server.url}/gzip-bomb", tmp_path)

    assert error.reason == FailureReason.DOWNLOAD_FAILED
    assert "Content-Encoding 'gzip'" in error.message
    assert list(tmp_path.iterdir()) == []


def test_redirect_within_source_followed(server: FileServer, tmp_path: Path) -> None:
    path = download_image(
        f"{server.url}/redirect",
        digest=PAYLOAD_DIGEST,
        directory=tmp_path,
        limits=limits(server.url),
    )

    assert path.read_bytes() == PAYLOAD
    assert server.log.paths == ["/redirect", "/agent.tar"]


def test_error_status_rejected(server: FileServer, tmp_path: Path) -> None:
    error = download_error(f"{server.url}/missing", tmp_path)

    assert error.reason == FailureReason.DOWNLOAD_HTTP_STATUS
    assert "404" in error.message
    assert list(tmp_path.iterdir()) == []


def test_stalled_body_times_out(server: FileServer, tmp_path: Path) -> None:
    error = download_error(f"{server.url}/stall", tmp_path, read_timeout=0.2)

    assert error.reason == FailureReason.DOWNLOAD_TIMEOUT
    assert list(tmp_path.iterdir()) == []


def test_refused_connection_fails(tmp_path: Path) -> None:
    # A bound socket that does not listen makes the kernel refuse connections to its port.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]

        error = download_error(f"http://127.0.0.1:{port}/agent.tar", tmp_path)

    assert error.reason == FailureReason.DOWNLOAD_FAILED
    assert list(tmp_path.iterdir()) == []


def test_http_url_rejected_before_request(server: FileServer, tmp_path: Path) -> None:
    https_only = DownloadLimits(
        max_size=1024, connect_timeout=1, read_timeout=1, total_timeout=1, allow_http=False
    )

    with pytest.raises(ImageRejected) as error:
        download_image(
            f"{server.url}/agent.tar", digest=PAYLOAD_DIGEST, directory=tmp_path, limits=https_only
        )

    assert error.value.reason == FailureReason.URL_NOT_ALLOWED
    assert server.log.paths == []
