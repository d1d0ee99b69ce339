"""From image URL and digest to a loaded, verified Docker image ID.

Order of steps, each failing closed: URL scheme and trusted source (also for cached digests),
cache lookup, streaming download with digest check, signature check (on every start, cached or
not), tarball structure checks, image configuration checks, retag check, `docker load`, and a
check that the loaded image ID equals the config digest named by the manifest. Verified
tarballs are kept in a content-addressed folder (`<cache_dir>/sha256/<hex>.tar`), so a second
start of the same digest skips the download; a tarball enters the cache only after every check
passed. The cache manager (cache_manager.py) records each use and evicts tarballs from that
folder.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.common import logs
from services.supervisor.docker_adapter import DockerAdapter
from services.supervisor.download import DownloadLimits, check_requested_source, download_image
from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.image_config import check_image_config
from services.supervisor.signatures import SignaturePolicy, Verified, verify_image_signature
from services.supervisor.tarball import TarballLimits, inspect_image_tarball

logger = logging.getLogger(__name__)

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class ResolvedImage:
    """A verified image ready to run, and where it came from."""

    image_id: str
    digest: str
    downloaded: bool
    loaded: bool
    # None when the image ran unsigned, which only the development profile allows.
    signer: Verified | None = None


@dataclass(frozen=True, kw_only=True)
class SignatureCheck:
    """The signature or bundle of a start request, and whether the image must be signed."""

    policy: SignaturePolicy | None
    required: bool
    signature: str | None = None
    bundle: dict[str, Any] | None = None

    def verify(self, tarball: Path, digest: str) -> Verified | None:
        """Return the signer of `tarball`, or None for an unsigned image that may run.

        Raises ImageRejected when a signature is required or given and does not verify.
        """
        present = bool(self.signature and self.signature.strip()) or self.bundle is not None
        if not present and not self.required:
            return None
        if self.policy is None:
            raise ImageRejected(
                FailureReason.SIGNER_NOT_TRUSTED,
                "the request carries a signature, but this supervisor has no signer to check "
                "it against; set --image-signing-key or --image-signing-trusted-root",
            )
        return verify_image_signature(
            self.policy,
            tarball=tarball,
            digest=digest,
            signature=self.signature,
            bundle=self.bundle,
        )


class ImageStore:
    """Download, verify, cache and load agent images."""

    def __init__(
        self,
        docker: DockerAdapter,
        *,
        cache_dir: Path,
        download_limits: DownloadLimits,
        tarball_limits: TarballLimits,
    ) -> None:
        self._docker = docker
        self._cache_dir = cache_dir
        self._download_limits = download_limits
        self._tarball_limits = tarball_limits
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        for folder in (self._blob_dir, self._partial_dir):
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)

    @property
    def _blob_dir(self) -> Path:
        return self._cache_dir / "sha256"

    @property
    def _partial_dir(self) -> Path:
        return self._cache_dir / "partial"

    def cached_tarball(self, digest: str) -> Path:
        """Return where the verified tarball of `digest` is or would be kept."""
        return self._blob_dir / f"{digest.removeprefix('sha256:')}.tar"

    def cached_tarballs(self) -> dict[str, os.stat_result]:
        """Return the digest and file status of every tarball in the cache folder.

        Files whose name is not 64 lower-case hex digits and `.tar` are left out: the cache
        never writes such names.
        """
        found = {}
        for path in self._blob_dir.glob("*.tar"):
            if _HEX_DIGEST.fullmatch(path.stem):
                found[f"sha256:{path.stem}"] = path.stat()
        return found

    def remove_cached(self, digest: str) -> bool:
        """Delete the cached tarball of `digest`; return whether it existed.

        Waits for a start that is reading the tarball. Raises OSError when the file cannot be
        deleted.
        """
        with self._lock_for(digest):
            path = self.cached_tarball(digest)
            if not path.exists():
                return False
            path.unlink()
        logger.info("deleted cached tarball %s", digest, extra={logs.IMAGE_DIGEST: digest})
        return True

    def remove_partial_downloads(self) -> int:
        """Delete leftovers of downloads interrupted by a crash; return how many."""
        removed = 0
        for leftover in self._partial_dir.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def resolve(
        self,
        url: str,
        digest: str,
        *,
        known_image_id: str | None,
        signatures: SignatureCheck | None = None,
    ) -> ResolvedImage:
        """Return a loaded image for `digest`, downloading and checking it when needed.

        `known_image_id` is the ID recorded for this digest by an earlier start, if any. The
        signature is checked on every start, cached or not, because each request brings its
        own. Raises ImageRejected or AgentStartError with a fixed reason; nothing that failed
        a check is loaded or cached.
        """
        check = signatures or SignatureCheck(policy=None, required=False)
        check_requested_source(url, self._download_limits)
        with self._lock_for(digest):
            cached = self.cached_tarball(digest)
            # An Ed25519 signature covers the whole file, so a loaded image is reused only
            # while its verified tarball is still cached.
            reusable = cached.exists() or check.policy is None
            if known_image_id and reusable and self._docker.image_exists(known_image_id):
                signer = check.verify(cached, digest)
                logger.info(
                    "image %s already loaded as %s",
                    digest,
                    known_image_id,
                    extra={logs.IMAGE_DIGEST: digest, logs.IMAGE_ID: known_image_id},
                )
                return ResolvedImage(
                    image_id=known_image_id,
                    digest=digest,
                    downloaded=False,
                    loaded=False,
                    signer=signer,
                )
            if cached.exists():
                logger.info(
                    "using cached tarball for %s", digest, extra={logs.IMAGE_DIGEST: digest}
                )
                signer = check.verify(cached, digest)
                image_id = self._verify_and_load(cached, digest)
                return ResolvedImage(
                    image_id=image_id, digest=digest, downloaded=False, loaded=True, signer=signer
                )
            # Order, each step failing closed: download with streaming hash and digest check,
            # signature, tarball checks, docker load, loaded ID against the manifest.
            partial = download_image(
                url, digest=digest, directory=self._partial_dir, limits=self._download_limits
            )
            try:
                signer = check.verify(partial, digest)
                image_id = self._verify_and_load(partial, digest)
                os.replace(partial, cached)
            finally:
                partial.unlink(missing_ok=True)
            return ResolvedImage(
                image_id=image_id, digest=digest, downloaded=True, loaded=True, signer=signer
            )

    def _verify_and_load(self, tarball_path: Path, digest: str) -> str:
        tarball = inspect_image_tarball(tarball_path, limits=self._tarball_limits)
        check_image_config(tarball.config)
        for tag in tarball.repo_tags:
            owner = self._docker.tag_owner(tag)
            if owner is not None and owner != tarball.config_digest:
                raise ImageRejected(
                    FailureReason.RETAG_EXISTING_IMAGE,
                    f"tarball tag {tag!r} already names image {owner}; loading it would move "
                    "the tag. Save the image without tags (docker save <image ID>)",
                )
        if self._docker.image_exists(tarball.config_digest):
            return tarball.config_digest
        loaded = self._docker.load_image(tarball_path)
        if tarball.config_digest not in loaded:
            # What Docker loaded is not what the checks saw, so none of it may stay.
            for image_id in loaded:
                removal = self._docker.remove_image(image_id)
                logger.error(
                    "removed image %s that docker load made from %s instead of %s: %s",
                    image_id,
                    digest,
                    tarball.config_digest,
                    removal.value,
                    extra={logs.IMAGE_DIGEST: digest, logs.IMAGE_ID: image_id},
                )
            raise ImageRejected(
                FailureReason.IMAGE_ID_MISMATCH,
                f"docker load reported {loaded}, expected {tarball.config_digest} from the "
                "manifest",
            )
        logger.info(
            "loaded image %s from %s",
            tarball.config_digest,
            digest,
            extra={logs.IMAGE_DIGEST: digest, logs.IMAGE_ID: tarball.config_digest},
        )
        return tarball.config_digest

    def _lock_for(self, digest: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(digest, threading.Lock())
