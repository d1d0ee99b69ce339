"""Image download: check the source, stream a tarball to a temporary file while hashing it.

First step of every agent start. Before any connection, the URL and every redirect target pass
the same checks (image_sources.py): scheme, no credentials, a canonical path, a trusted source
when --trusted-image-sources is set, and the addresses of the host. The host is resolved once,
and the request goes to a checked address while `Host` and the TLS server name, which the
certificate is verified against, stay the host name. So a second lookup by the HTTP client
cannot return an unchecked address.

Nothing downloaded here is trusted until its SHA-256 equals the digest the caller gave. On any
failure the temporary file is removed before the error reaches the caller, so a rejected
download leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin

import httpx

from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.image_sources import (
    ImageUrl,
    IPAddress,
    TrustedSource,
    check_addresses,
    parse_image_url,
    trusted_source_for,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# Resolves a host name for a TCP port within a timeout in seconds. Raises TimeoutError when
# it takes longer and OSError when the name does not resolve.
Resolver = Callable[[str, int, float], Sequence[IPAddress]]


@dataclass(frozen=True, kw_only=True)
class DownloadLimits:
    """Bounds and source policy of one download: size in bytes, timeouts in seconds.

    An empty `trusted_sources` allows every host whose addresses pass the address checks.
    """

    max_size: int
    connect_timeout: float
    read_timeout: float
    total_timeout: float
    allow_http: bool
    trusted_sources: tuple[TrustedSource, ...] = ()
    max_redirects: int = DEFAULT_MAX_REDIRECTS


def check_image_url(url: str, *, allow_http: bool) -> ImageUrl:
    """Return the canonical form of `url`, an absolute https URL (http when allowed).

    Raises ImageRejected with reason `url_not_allowed` otherwise.
    """
    return parse_image_url(url, allow_http=allow_http)


def check_requested_source(url: str, limits: DownloadLimits) -> ImageUrl:
    """Check the scheme and trusted source of a requested URL without connecting anywhere.

    Runs on every start, also when the digest is already cached. Otherwise anyone with the
    digest of a cached image could start it from any URL, without access to its source.
    Raises ImageRejected with reason `url_not_allowed` or `source_not_trusted`.
    """
    checked = check_image_url(url, allow_http=limits.allow_http)
    trusted_source_for(checked, limits.trusted_sources)
    return checked


def resolve_host(name: str, port: int, timeout: float) -> tuple[IPAddress, ...]:
    """Return the addresses of `name` from the C library's getaddrinfo, in its order.

    The lookup runs in a daemon thread, because getaddrinfo cannot be interrupted: after
    `timeout` seconds this raises TimeoutError and leaves the thread to end on its own.
    Raises OSError when the name does not resolve.
    """
    answers: list[tuple[socket.AddressFamily, str]] = []
    errors: list[OSError] = []
    finished = threading.Event()

    def lookup() -> None:
        try:
            for family, _, _, _, sockaddr in socket.getaddrinfo(
                name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            ):
                answers.append((family, str(sockaddr[0])))
        except OSError as exc:
            errors.append(exc)
        except UnicodeError as exc:
            errors.append(OSError(f"{name!r} cannot be encoded: {exc}"))
        finally:
            finished.set()

    threading.Thread(target=lookup, name=f"resolve-{name}", daemon=True).start()
    if not finished.wait(timeout):
        raise TimeoutError(f"getaddrinfo did not return within {timeout:g} s")
    if errors:
        raise errors[0]

    addresses: list[IPAddress] = []
    for family, text in answers:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        # A link-local IPv6 address comes with a zone such as `%eth0`. The zone is dropped
        # because the address checks deny link-local addresses whatever their zone.
        address = ip_address(text.partition("%")[0])
        if address not in addresses:
            addresses.append(address)
    return tuple(addresses)


def download_image(
    url: str,
    *,
    digest: str,
    directory: Path,
    limits: DownloadLimits,
    resolver: Resolver = resolve_host,
    tls_context: ssl.SSLContext | None = None,
) -> Path:
    """Download `url` into a new file under `directory` and return its path.

    The file's SHA-256 must equal `digest` (`sha256:<hex>`). Up to `limits.max_redirects`
    redirects are followed, each target checked like the URL itself. `resolver` and
    `tls_context` (default: the certifi CA bundle) exist for tests. Raises ImageRejected with
    a fixed reason; the caller owns the returned file.
    """
    first = check_image_url(url, allow_http=limits.allow_http)
    directory.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="download-", suffix=".tar.part", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as output:
            actual = _fetch(
                first,
                output,
                limits=limits,
                resolver=resolver,
                tls_context=tls_context or httpx.create_ssl_context(trust_env=False),
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if actual != digest:
        path.unlink(missing_ok=True)
        raise ImageRejected(
            FailureReason.DIGEST_MISMATCH,
            f"downloaded tarball has digest {actual}, expected {digest}; nothing was loaded",
        )
    return path


def _fetch(
    first: ImageUrl,
    output: BinaryIO,
    *,
    limits: DownloadLimits,
    resolver: Resolver,
    tls_context: ssl.SSLContext,
) -> str:
    """Follow redirects from `first` to a 200 response and stream its body; return its digest."""
    deadline = time.monotonic() + limits.total_timeout
    current = first
    previous: ImageUrl | None = None
    redirects = 0
    while True:
        addresses = _checked_addresses(
            current, previous, limits=limits, resolver=resolver, deadline=deadline
        )
        try:
            with connect_checked(
                current, addresses, limits=limits, tls_context=tls_context
            ) as response:
                if response.status_code in REDIRECT_STATUSES:
                    target = _redirect_target(current, response, redirects, limits)
                    previous, current = current, target
                    redirects += 1
                    continue
                return _read_body(current, response, output, limits=limits, deadline=deadline)
        except httpx.TimeoutException as exc:
            raise ImageRejected(
                FailureReason.DOWNLOAD_TIMEOUT, f"download of {current.display} timed out: {exc!r}"
            ) from exc
        except httpx.HTTPError as exc:
            raise ImageRejected(
                FailureReason.DOWNLOAD_FAILED, f"download of {current.display} failed: {exc!r}"
            ) from exc


def _checked_addresses(
    url: ImageUrl,
    previous: ImageUrl | None,
    *,
    limits: DownloadLimits,
    resolver: Resolver,
    deadline: float,
) -> Sequence[IPAddress]:
    """Check `url` against the sources and its host's addresses; return those addresses."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ImageRejected(
            FailureReason.DOWNLOAD_TIMEOUT,
            f"download of {url.display} took over {limits.total_timeout:g} s",
        )
    try:
        source = trusted_source_for(url, limits.trusted_sources)
        addresses: Sequence[IPAddress]
        if url.address is not None:
            addresses = (url.address,)
        else:
            addresses = _resolve(url, resolver, timeout=min(limits.connect_timeout, remaining))
        check_addresses(url, addresses, source=source)
    except ImageRejected as exc:
        if previous is None:
            raise
        raise ImageRejected(
            exc.reason, f"{exc.message} (redirected from {previous.display})"
        ) from None
    return addresses


def _resolve(url: ImageUrl, resolver: Resolver, *, timeout: float) -> Sequence[IPAddress]:
    try:
        return resolver(url.host, url.port, timeout)
    except TimeoutError as exc:
        raise ImageRejected(
            FailureReason.DOWNLOAD_TIMEOUT, f"resolving {url.host} of {url.origin} timed out: {exc}"
        ) from exc
    except OSError as exc:
        raise ImageRejected(
            FailureReason.DOWNLOAD_FAILED, f"cannot resolve {url.host} of {url.origin}: {exc}"
        ) from exc


@contextlib.contextmanager
def connect_checked(
    url: ImageUrl,
    addresses: Sequence[IPAddress],
    *,
    limits: DownloadLimits,
    tls_context: ssl.SSLContext,
) -> Iterator[httpx.Response]:
    """Send GET `url` to the first of `addresses` that accepts a connection; yield the response.

    The caller has checked `addresses`; no name is resolved here. `Host` is `url`'s host and
    port, and for https with a host name the TLS server name is that name too, so the
    certificate is verified against the name, not the address. Each call opens its own
    client, so no connection verified for one name carries a request for another. Raises
    ImageRejected (`download_failed`, or `download_timeout` when every attempt timed out) when
    no address accepts.
    """
    timeout = httpx.Timeout(
        connect=limits.connect_timeout, read=limits.read_timeout, write=30.0, pool=5.0
    )
    extensions = {"sni_hostname": url.host} if url.address is None else {}
    headers = {"Host": url.authority, "Accept-Encoding": "identity"}
    failures: list[tuple[IPAddress, httpx.TransportError]] = []
    with httpx.Client(
        timeout=timeout, follow_redirects=False, trust_env=False, verify=tls_context
    ) as client:
        for address in addresses:
            request = client.build_request(
                "GET",
                httpx.URL(
                    scheme=url.scheme,
                    host=address.compressed,
                    port=url.port,
                    raw_path=url.target.encode("ascii"),
                ),
                headers=headers,
                extensions=extensions,
            )
            try:
                response = client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append((address, exc))
                logger.info("cannot connect to %s at %s: %r", url.origin, address, exc)
                continue
            try:
                yield response
            finally:
                response.close()
            return

    reason = (
        FailureReason.DOWNLOAD_TIMEOUT
        if all(isinstance(exc, httpx.ConnectTimeout) for _, exc in failures)
        else FailureReason.DOWNLOAD_FAILED
    )
    tried = "; ".join(f"{address}: {exc!r}" for address, exc in failures)
    raise ImageRejected(reason, f"cannot connect to {url.origin} ({tried})")


def _redirect_target(
    url: ImageUrl, response: httpx.Response, redirects: int, limits: DownloadLimits
) -> ImageUrl:
    status = response.status_code
    location = response.headers.get("location", "").strip()
    if not location:
        raise ImageRejected(
            FailureReason.DOWNLOAD_HTTP_STATUS,
            f"GET {url.display} answered HTTP {status} without a Location header",
        )
    if redirects >= limits.max_redirects:
        raise ImageRejected(
            FailureReason.TOO_MANY_REDIRECTS,
            f"GET {url.display} answered HTTP {status} after {redirects} redirects; at most "
            f"{limits.max_redirects} are followed (--image-max-redirects)",
        )
    try:
        target = parse_image_url(urljoin(url.text, location), allow_http=limits.allow_http)
    except ImageRejected as exc:
        raise ImageRejected(exc.reason, f"redirect from {url.display}: {exc.message}") from None
    logger.info("following HTTP %d redirect from %s to %s", status, url.display, target.display)
    return target


def _read_body(
    url: ImageUrl,
    response: httpx.Response,
    output: BinaryIO,
    *,
    limits: DownloadLimits,
    deadline: float,
) -> str:
    if response.status_code != httpx.codes.OK:
        raise ImageRejected(
            FailureReason.DOWNLOAD_HTTP_STATUS,
            f"GET {url.display} answered HTTP {response.status_code}, expected 200",
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        # A compressed body can expand a thousandfold in one decoded chunk, before any size
        # check could run, so only the plain bytes of the tarball are accepted.
        raise ImageRejected(
            FailureReason.DOWNLOAD_FAILED,
            f"GET {url.display} answered with Content-Encoding {encoding!r}; serve the tarball "
            "without content encoding",
        )
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_size:
        raise ImageRejected(
            FailureReason.DOWNLOAD_TOO_LARGE,
            f"image is {declared} bytes, over the limit of {limits.max_size} bytes "
            "(--image-max-size)",
        )

    digest = hashlib.sha256()
    received = 0
    # Chunks as the socket delivers them: rechunking to a fixed size costs a copy per byte.
    for chunk in response.iter_raw():
        received += len(chunk)
        if received > limits.max_size:
            raise ImageRejected(
                FailureReason.DOWNLOAD_TOO_LARGE,
                f"image is over the limit of {limits.max_size} bytes (--image-max-size)",
            )
        if time.monotonic() > deadline:
            raise ImageRejected(
                FailureReason.DOWNLOAD_TIMEOUT,
                f"download of {url.display} took over {limits.total_timeout:g} s",
            )
        digest.update(chunk)
        output.write(chunk)
    logger.info("downloaded %d bytes from %s", received, url.display)
    return f"sha256:{digest.hexdigest()}"
