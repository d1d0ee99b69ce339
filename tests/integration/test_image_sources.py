"""Image downloads to internal addresses, refused before any connection, with real networking.

The link-local case uses the fake internet host of tests/support/fakenet.py, whose listener
logs every TCP connection to 169.254.42.42: a refused download must leave no hit there, while
the control, with a source that names the address, must leave one. The loopback cases resolve
`localhost` with the system resolver, as the supervisor does for any host name.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.supervisor.download import DownloadLimits, download_image, resolve_host
from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.image_sources import parse_trusted_source
from tests.support.fakenet import LINK_LOCAL_FAKE_HOST, FakeInternet, fake_internet

pytestmark = pytest.mark.integration

DIGEST = "sha256:" + "0" * 64
# The listener writes its log line before it replies, but a line can reach the file a moment
# after a rejected client gave up. A test waits this long before it counts the hits.
SETTLE_SECONDS = 0.5


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeInternet]:
    with fake_internet(tmp_path_factory.mktemp("fakenet")) as running:
        yield running


def limits(*sources: str) -> DownloadLimits:
    return DownloadLimits(
        max_size=1024 * 1024,
        connect_timeout=2.0,
        read_timeout=2.0,
        total_timeout=10.0,
        allow_http=True,
        trusted_sources=tuple(parse_trusted_source(source, allow_http=True) for source in sources),
    )


def hits_to(internet: FakeInternet, since: int, address: str) -> list[str]:
    time.sleep(SETTLE_SECONDS)
    return [
        f"{hit.protocol} {hit.local}:{hit.port}"
        for hit in internet.listener.hits(since)
        if hit.local == address
    ]


def test_link_local_url_refused_before_connecting(internet: FakeInternet, tmp_path: Path) -> None:
    mark = internet.listener.mark()

    with pytest.raises(ImageRejected) as error:
        download_image(
            f"http://{LINK_LOCAL_FAKE_HOST}/agent.tar",
            digest=DIGEST,
            directory=tmp_path,
            limits=limits(),
        )

    assert error.value.reason == FailureReason.SOURCE_ADDRESS_DENIED
    assert f"{LINK_LOCAL_FAKE_HOST} is denied as address_link_local" in error.value.message
    assert hits_to(internet, mark, LINK_LOCAL_FAKE_HOST) == []
    assert list(tmp_path.iterdir()) == []


def test_link_local_source_named_connects(internet: FakeInternet, tmp_path: Path) -> None:
    # The control for the test above: the route to the fake host works, and a source that
    # names the address lets the download through the address check.
    mark = internet.listener.mark()

    with pytest.raises(ImageRejected) as error:
        download_image(
            f"http://{LINK_LOCAL_FAKE_HOST}/agent.tar",
            digest=DIGEST,
            directory=tmp_path,
            limits=limits(f"http://{LINK_LOCAL_FAKE_HOST}/"),
        )

    # The fake host replies to every connection with a short text, not the tarball.
    assert error.value.reason == FailureReason.DIGEST_MISMATCH
    assert hits_to(internet, mark, LINK_LOCAL_FAKE_HOST) == [f"tcp {LINK_LOCAL_FAKE_HOST}:80"]
    assert list(tmp_path.iterdir()) == []


def test_localhost_resolves_to_loopback() -> None:
    addresses = resolve_host("localhost", 80, 5.0)

    assert addresses
    assert all(address.is_loopback for address in addresses)


@pytest.mark.parametrize("named", [False, True], ids=["no-sources", "name-source"])
def test_localhost_url_refused_before_connecting(named: bool, tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        sources = (f"http://localhost:{port}/",) if named else ()

        with pytest.raises(ImageRejected) as error:
            download_image(
                f"http://localhost:{port}/agent.tar",
                digest=DIGEST,
                directory=tmp_path,
                limits=limits(*sources),
            )

        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()

    assert error.value.reason == FailureReason.SOURCE_ADDRESS_DENIED
    assert f"host localhost of http://localhost:{port} resolves to" in error.value.message
    assert "address_loopback" in error.value.message
    assert list(tmp_path.iterdir()) == []


def test_ip_source_does_not_cover_name(tmp_path: Path) -> None:
    # A source naming 127.0.0.1 does not cover the name localhost, although it resolves there.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]

        with pytest.raises(ImageRejected) as error:
            download_image(
                f"http://localhost:{port}/agent.tar",
                digest=DIGEST,
                directory=tmp_path,
                limits=limits(f"http://127.0.0.1:{port}/"),
            )

        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()

    assert error.value.reason == FailureReason.SOURCE_NOT_TRUSTED
    assert list(tmp_path.iterdir()) == []
