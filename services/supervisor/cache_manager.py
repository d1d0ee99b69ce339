"""The image cache of one host: counting uses, evicting by size and age, and purges.

Flow: a start pins its digest (`pinned`) while it runs, and records the use once ImageStore
has resolved the image (`record_use`). A download wakes the eviction loop (`run`), which also
runs every --cache-eviction-interval seconds. The gateway's purge requests arrive over NATS
(`purge`). Evicting an image deletes its tarball, its state in Redis (services/supervisor/
cache.py) and the loaded Docker image, each step logged and audited as `image.cache_evicted`.

An image is in use while an agent of this host that is not in a final state names its
digest, read from the agent records in Redis, so the answer survives restarts and follows
reconciliation. Starts in progress in this process are added through their pins. In-use
images are never evicted. The in-use check is repeated right before each removal, and a
start of a digest that is being evicted waits until the eviction is done, so a start never
loses its image half way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from libs.common import logs
from libs.common.audit import AuditPublisher
from libs.common.errors import StoreError
from libs.common.messages import (
    FINAL_STATES,
    AuditOutcome,
    PurgedImage,
    PurgeSkipReason,
    SkippedImage,
    utc_now,
)
from libs.common.store import AgentStore
from services.supervisor import metrics
from services.supervisor.cache import CacheState
from services.supervisor.docker_adapter import DockerAdapter, ImageRemoval
from services.supervisor.errors import DockerUnavailable
from services.supervisor.eviction import (
    CacheEntry,
    Eviction,
    EvictionReason,
    choose_evictions,
    least_recently_used,
)
from services.supervisor.images import ImageStore, ResolvedImage
from services.supervisor.settings import SupervisorSettings

logger = logging.getLogger(__name__)

ACTOR = "supervisor"


class LoadedImageOutcome(StrEnum):
    """Outcome of an eviction for the loaded Docker image, as reported in the audit event."""

    REMOVED = "removed"
    NOT_LOADED = "not_loaded"
    KEPT_IN_USE = "kept_in_use"
    KEPT_SHARED = "kept_shared"
    UNKNOWN_ID = "unknown_id"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True)
class InUse:
    """Digests and image IDs of the agents of this host that are not finished."""

    digests: frozenset[str]
    image_ids: frozenset[str]


@dataclass(frozen=True, kw_only=True)
class PurgeResult:
    """Images that one purge evicted and images that it skipped."""

    purged: list[PurgedImage]
    skipped: list[SkippedImage]


class CacheManager:
    """Count uses of cached images and evict them by size, age and on request."""

    def __init__(
        self,
        settings: SupervisorSettings,
        *,
        state: CacheState,
        images: ImageStore,
        docker: DockerAdapter,
        store: AgentStore,
        audit: AuditPublisher,
    ) -> None:
        self._settings = settings
        self._state = state
        self._images = images
        self._docker = docker
        self._store = store
        self._audit = audit
        self._pins: Counter[str] = Counter()
        self._evicting: dict[str, asyncio.Event] = {}
        # One eviction run or purge at a time, so that no image is evicted or counted twice.
        self._removal = asyncio.Lock()
        self._wake = asyncio.Event()

    @contextlib.asynccontextmanager
    async def pinned(self, digest: str) -> AsyncIterator[None]:
        """Keep `digest` from being evicted while the block runs; wait out its eviction first."""
        while (eviction := self._evicting.get(digest)) is not None:
            await eviction.wait()
        self._pins[digest] += 1
        try:
            yield
        finally:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    async def record_use(self, resolved: ResolvedImage) -> None:
        """Count a start of `resolved`: a miss when it was downloaded, otherwise a hit.

        A download also wakes the eviction loop. Raises StoreError when Redis fails.
        """
        size = await asyncio.to_thread(self._tarball_size, resolved.digest)
        await self._state.record_use(
            resolved.digest,
            size=size,
            image_id=resolved.image_id,
            hit=not resolved.downloaded,
            now=utc_now(),
        )
        if resolved.downloaded:
            self._wake.set()
        await self.refresh_metrics()

    async def reconcile(self) -> None:
        """Bring the state in Redis in line with the tarballs on disk and the loaded images.

        A tarball without state (left by a crash, or by a version without cache state) is
        adopted with its file time as its last use. An entry whose tarball is gone keeps size
        0 while its image is loaded and is dropped otherwise.
        """
        on_disk = await asyncio.to_thread(self._images.cached_tarballs)
        entries = {entry.digest: entry for entry in await self._state.entries()}
        for digest, status in on_disk.items():
            entry = entries.get(digest)
            if entry is None:
                used = datetime.fromtimestamp(status.st_mtime, UTC)
                image_id = await self._store.image_id_for(digest) or ""
                adopted = CacheEntry(
                    digest=digest,
                    size=status.st_size,
                    image_id=image_id,
                    first_used=used,
                    last_used=used,
                )
                await self._state.put(adopted)
                logger.warning(
                    "adopted cached tarball %s (%d bytes), which had no cache state",
                    digest,
                    status.st_size,
                    extra={logs.IMAGE_DIGEST: digest},
                )
            elif entry.size != status.st_size:
                await self._state.put(replace(entry, size=status.st_size))

        for digest, entry in entries.items():
            if digest in on_disk:
                continue
            loaded = bool(entry.image_id) and await self._image_loaded(entry.image_id)
            if loaded:
                if entry.size:
                    await self._state.put(replace(entry, size=0))
                continue
            await self._state.remove(digest, reason=None)
            logger.warning(
                "dropped cache entry %s: neither its tarball nor its image exists",
                digest,
                extra={logs.IMAGE_DIGEST: digest},
            )
        await self.refresh_metrics()

    async def run(self) -> None:
        """Evict now, then every --cache-eviction-interval seconds and after each download."""
        interval = self._settings.cache_eviction_interval
        while True:
            try:
                await self.evict()
            except (DockerUnavailable, StoreError, OSError) as exc:
                logger.error("image cache eviction failed: %s; retrying in %g s", exc, interval)
            except Exception:
                logger.exception("image cache eviction failed unexpectedly; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()

    async def evict(self) -> list[PurgedImage]:
        """Evict what is over --cache-max-size or older than --cache-max-age; return it."""
        max_size = int(self._settings.cache_max_size)
        async with self._removal:
            entries = await self._state.entries()
            in_use = await self._in_use()
            plan = choose_evictions(
                entries,
                in_use=in_use.digests,
                max_size=max_size,
                max_age=timedelta(seconds=self._settings.cache_max_age),
                now=utc_now(),
            )
            evicted = []
            for eviction in plan:
                result = await self._evict_one(eviction)
                if isinstance(result, PurgedImage):
                    evicted.append(result)
            remaining = sum(entry.size for entry in entries) - sum(e.size for e in evicted)
            if remaining > max_size:
                logger.warning(
                    "image cache contains %d bytes, over --cache-max-size (%d bytes), "
                    "because agents still use those images",
                    remaining,
                    max_size,
                )
        await self.refresh_metrics()
        return evicted

    async def purge(self, digest: str | None) -> PurgeResult:
        """Evict the image `digest`, or every cached image when None, unless an agent uses it."""
        async with self._removal:
            entries = least_recently_used(await self._state.entries())
            if digest is not None:
                entries = [entry for entry in entries if entry.digest == digest]
                if not entries:
                    skip = SkippedImage(digest=digest, reason=PurgeSkipReason.NOT_CACHED)
                    return PurgeResult(purged=[], skipped=[skip])
            purged: list[PurgedImage] = []
            skipped: list[SkippedImage] = []
            for entry in entries:
                eviction = Eviction(
                    digest=entry.digest,
                    size=entry.size,
                    image_id=entry.image_id,
                    reason=EvictionReason.PURGE,
                )
                result = await self._evict_one(eviction)
                if isinstance(result, PurgedImage):
                    purged.append(result)
                else:
                    skipped.append(result)
        await self.refresh_metrics()
        return PurgeResult(purged=purged, skipped=skipped)

    async def refresh_metrics(self) -> None:
        """Read the cache state and totals from Redis into the metrics; log a failure."""
        try:
            entries = await self._state.entries()
            totals = await self._state.totals()
            in_use = await self._in_use()
        except StoreError as exc:
            logger.warning("image cache metrics not updated: %s", exc)
            return
        metrics.CACHE.reading = metrics.CacheReading(
            entries=len(entries),
            size=sum(entry.size for entry in entries),
            max_size=int(self._settings.cache_max_size),
            in_use=sum(1 for entry in entries if entry.digest in in_use.digests),
            hits=totals.hits,
            misses=totals.misses,
            evictions=totals.evictions,
        )

    async def _evict_one(self, eviction: Eviction) -> PurgedImage | SkippedImage:
        digest = eviction.digest
        # Read again: an agent may have started since the plan was made.
        in_use = await self._in_use()
        if digest in in_use.digests:
            return SkippedImage(digest=digest, reason=PurgeSkipReason.IN_USE)
        # No await between the check above and this mark, so no start can slip in between.
        done = asyncio.Event()
        self._evicting[digest] = done
        try:
            return await self._remove(eviction, in_use)
        finally:
            del self._evicting[digest]
            done.set()

    async def _remove(self, eviction: Eviction, in_use: InUse) -> PurgedImage | SkippedImage:
        digest = eviction.digest
        extra = {logs.IMAGE_DIGEST: digest, logs.REASON: eviction.reason.value}
        try:
            await asyncio.to_thread(self._images.remove_cached, digest)
        except OSError as exc:
            logger.error("cannot delete cached tarball of %s: %s", digest, exc, extra=extra)
            return SkippedImage(digest=digest, reason=PurgeSkipReason.FAILED)
        await self._state.remove(digest, reason=eviction.reason)
        image = await self._remove_loaded_image(eviction.image_id, in_use)

        self._audit.emit(
            "image.cache_evicted",
            outcome=AuditOutcome.SUCCESS,
            actor=ACTOR,
            reason_code=eviction.reason.value,
            details={
                "image_digest": digest,
                "size": eviction.size,
                "reason": eviction.reason.value,
                "image_id": eviction.image_id,
                "loaded_image": image.value,
            },
        )
        logger.info(
            "evicted cached image %s (%d bytes, reason %s, loaded image %s)",
            digest,
            eviction.size,
            eviction.reason.value,
            image.value,
            extra=extra,
        )
        return PurgedImage(
            digest=digest, size=eviction.size, image_removed=image == LoadedImageOutcome.REMOVED
        )

    async def _remove_loaded_image(self, image_id: str, in_use: InUse) -> LoadedImageOutcome:
        if not image_id:
            return LoadedImageOutcome.UNKNOWN_ID
        if image_id in in_use.image_ids:
            return LoadedImageOutcome.KEPT_IN_USE
        # Several digests can hold the same image (the same image saved with other tags).
        if any(entry.image_id == image_id for entry in await self._state.entries()):
            return LoadedImageOutcome.KEPT_SHARED
        try:
            users = await asyncio.to_thread(self._docker.containers_using_image, image_id)
            if users:
                return LoadedImageOutcome.KEPT_IN_USE
            removal = await asyncio.to_thread(self._docker.remove_image, image_id)
        except DockerUnavailable as exc:
            logger.error(
                "cannot remove image %s: %s", image_id, exc, extra={logs.IMAGE_ID: image_id}
            )
            return LoadedImageOutcome.FAILED
        return {
            ImageRemoval.REMOVED: LoadedImageOutcome.REMOVED,
            ImageRemoval.NOT_FOUND: LoadedImageOutcome.NOT_LOADED,
            ImageRemoval.CONFLICT: LoadedImageOutcome.KEPT_IN_USE,
        }[removal]

    async def _in_use(self) -> InUse:
        digests: set[str] = set()
        image_ids: set[str] = set()
        for agent_id in await self._store.active_on_host(self._settings.host_id):
            record = await self._store.get(agent_id)
            if record is None or record.state in FINAL_STATES:
                continue
            digests.add(record.image_digest)
            if record.image_id:
                image_ids.add(record.image_id)
        # Added after the last await, so the caller's check sees the pins of this moment.
        digests.update(self._pins)
        return InUse(digests=frozenset(digests), image_ids=frozenset(image_ids))

    async def _image_loaded(self, image_id: str) -> bool:
        return await asyncio.to_thread(self._docker.image_exists, image_id)

    def _tarball_size(self, digest: str) -> int:
        try:
            return self._images.cached_tarball(digest).stat().st_size
        except FileNotFoundError:
            return 0  # only the loaded image is left; see CacheState
