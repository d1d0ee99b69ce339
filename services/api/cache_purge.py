"""`POST /v1/cache/purge`: evict cached images on one host or on every host with a cache.

The gateway sends a CachePurgeRequest to `agents.v1.host.<host>.cache` of each host, in
parallel, and returns each host's reply. "Every host" means the hosts that Redis lists as
having cached images (`agent-runner:cache-hosts`, which each supervisor keeps), not a
broadcast. So the gateway has the list of replies to wait for, responds as soon as the last
one arrives, and reports a host that has cached images but does not reply instead of leaving
it out. A host whose cache is empty has nothing to purge and is not asked.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter

from libs.common import bus, logs
from libs.common.errors import BusError, RemoteError
from libs.common.messages import (
    AuditOutcome,
    CachePurgeReply,
    CachePurgeRequest,
    host_subject,
)
from services.api.errors import ApiError, error_responses
from services.api.routes import CallerDep, Services
from services.api.schemas import CachePurgeResult, HostError, HostPurge, PurgeCacheRequest

logger = logging.getLogger(__name__)

# A purge may wait for an eviction run in progress, and removing an image takes Docker a
# while per image.
PURGE_REPLY_EXTRA_SECONDS = 60.0
UNAVAILABLE = "supervisor_unavailable"
FAILED = "cache_purge_failed"

router = APIRouter(prefix="/v1", tags=["cache"])


@router.post("/cache/purge", response_model=CachePurgeResult, responses=error_responses(503))
async def purge_cache(body: PurgeCacheRequest, caller: CallerDep) -> CachePurgeResult:
    """Evict cached images; images that an agent still uses are skipped and listed."""
    key_id, services = caller.key_id, caller.services
    cache_hosts = await services.store.cache_hosts()
    hosts = [body.host_id] if body.host_id is not None else cache_hosts
    # A host that lists no cached image has nothing to purge, and asking it would turn a
    # stopped or mistyped host into a 503; it gets an empty result instead.
    results = list(
        await asyncio.gather(
            *(
                _purge_host(services, host, body.digest)
                if host in cache_hosts
                else _nothing_cached(host)
                for host in hosts
            )
        )
    )
    failed = [result for result in results if result.error is not None]
    services.audit.emit(
        "image.cache_purged",
        outcome=AuditOutcome.FAILURE if failed else AuditOutcome.SUCCESS,
        actor=key_id,
        details={
            "image_digest": body.digest,
            "host_id": body.host_id,
            "hosts": {result.host_id: _audit_summary(result) for result in results},
        },
    )
    if body.host_id is not None and failed:
        error = failed[0].error
        assert error is not None
        raise ApiError(503, error.code, error.message)
    return CachePurgeResult(hosts=results)


async def _purge_host(services: Services, host_id: str, digest: str | None) -> HostPurge:
    request = CachePurgeRequest(correlation_id=str(logs.current_correlation_id()), digest=digest)
    try:
        reply = await bus.request(
            services.nats,
            host_subject(host_id, "cache"),
            request,
            CachePurgeReply,
            timeout=services.settings.nats_timeout + PURGE_REPLY_EXTRA_SECONDS,
        )
    except RemoteError as exc:
        logger.error("supervisor %s failed to purge its cache: %s", host_id, exc)
        message = f"supervisor {host_id} failed to purge its cache: {exc.message}"
        return _failed(host_id, FAILED, message)
    except BusError as exc:
        logger.error("supervisor %s did not reply to a cache purge: %s", host_id, exc)
        message = f"supervisor {host_id} did not reply to the purge; try again later"
        return _failed(host_id, UNAVAILABLE, message)
    return HostPurge(host_id=host_id, purged=reply.purged, skipped=reply.skipped)


async def _nothing_cached(host_id: str) -> HostPurge:
    return HostPurge(host_id=host_id, purged=[], skipped=[])


def _failed(host_id: str, code: str, message: str) -> HostPurge:
    return HostPurge(
        host_id=host_id, purged=[], skipped=[], error=HostError(code=code, message=message)
    )


def _audit_summary(result: HostPurge) -> dict[str, object]:
    return {
        "purged": [image.digest for image in result.purged],
        "purged_bytes": sum(image.size for image in result.purged),
        "skipped": [image.model_dump(mode="json") for image in result.skipped],
        "error": None if result.error is None else result.error.code,
    }
