"""Image download: stream a tarball to a temporary file while hashing it.

First step of every agent start. Nothing downloaded here is trusted until its SHA-256 equals
the digest the caller gave. On any failure the temporary file is removed before the error
reaches the caller, so a rejected download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import httpx

from services.supervisor.errors import FailureReason, ImageRejected

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class DownloadLimits:
    """Bounds of one download: size in bytes, timeouts in seconds."""

    max_size: int
    connect_timeout: float
    read_timeout: float
    total_timeout: float
    allow_http: bool


def check_image_url(url: str, *, allow_http: bool) -> None:
    """Raise ImageRejected unless `url` is an absolute https URL (http when allowed)."""
    parts = urlsplit(url)
    allowed = {"https", "http"} if allow_http else {"https"}
    if parts.scheme not in allowed:
        hint = "" if allow_http else " (plain http:// is accepted only in the development profile)"
        raise ImageRejected(
            FailureReason.URL_NOT_ALLOWED,
            f"image URL scheme {parts.scheme!r} is not allowed; use https://{hint}",
        )
    # Credentials are checked before the host, so a rejected URL with a password is never
    # echoed in an error message.
    if parts.username is not None or parts.password is not None:
        raise ImageRejected(
            FailureReason.URL_NOT_ALLOWED,
            "image URL must not contain credentials; serve the tarball without them",
        )
    if not parts.hostname:
        raise ImageRejected(FailureReason.URL_NOT_ALLOWED, f"image URL {url!r} has no host")


def download_image(url: str, *, digest: str, directory: Path, limits: DownloadLimits) -> Path:
    """Download `url` into a new file under `directory` and return its path.

    The file's SHA-256 must equal `digest` (`sha256:<hex>`). Redirects are not followed,
    because every hop would need the same URL checks. Raises ImageRejected with a fixed
    reason; the caller owns the returned file.
    """
    check_image_url(url, allow_http=limits.allow_http)
    directory.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="download-", suffix=".tar.part", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as output:
            actual = _stream_to(url, output, limits=limits)
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


def _stream_to(url: str, output: BinaryIO, *, limits: DownloadLimits) -> str:
    digest = hashlib.sha256()
    received = 0
    deadline = time.monotonic() + limits.total_timeout
    timeout = httpx.Timeout(
        connect=limits.connect_timeout, read=limits.read_timeout, write=30.0, pool=5.0
    )
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
            client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response,
        ):
            if response.status_code != httpx.codes.OK:
                raise ImageRejected(
                    FailureReason.DOWNLOAD_HTTP_STATUS,
                    f"GET {url} answered HTTP {response.status_code}, expected 200"
                    + (" (redirects are not followed)" if response.is_redirect else ""),
                )
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                # A compressed body can expand a thousandfold in one decoded chunk, before any
                # size check could run, so only the plain bytes of the tarball are accepted.
                raise ImageRejected(
                    FailureReason.DOWNLOAD_FAILED,
                    f"GET {url} answered with Content-Encoding {encoding!r}; serve the tarball "
                    "without content encoding",
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_size:
                raise ImageRejected(
                    FailureReason.DOWNLOAD_TOO_LARGE,
                    f"image is {declared} bytes, over the limit of {limits.max_size} bytes "
                    "(--image-max-size)",
                )
            for chunk in response.iter_raw(CHUNK_SIZE):
                received += len(chunk)
                if received > limits.max_size:
                    raise ImageRejected(
                        FailureReason.DOWNLOAD_TOO_LARGE,
                        f"image is over the limit of {limits.max_size} bytes (--image-max-size)",
                    )
                if time.monotonic() > deadline:
                    raise ImageRejected(
                        FailureReason.DOWNLOAD_TIMEOUT,
                        f"download of {url} took over {limits.total_timeout:g} s",
                    )
                digest.update(chunk)
                output.write(chunk)
    except httpx.TimeoutException as exc:
        raise ImageRejected(
            FailureReason.DOWNLOAD_TIMEOUT, f"download of {url} timed out: {exc!r}"
        ) from exc
    except httpx.HTTPError as exc:
        raise ImageRejected(
            FailureReason.DOWNLOAD_FAILED, f"download of {url} failed: {exc!r}"
        ) from exc
    logger.info("downloaded %d bytes from %s", received, url)
    return f"sha256:{digest.hexdigest()}"
