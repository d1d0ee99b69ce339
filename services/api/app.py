"""The gateway application: middleware, error handlers, routes and shared connections.

Pipeline of a request: MetricsMiddleware (counts responses and serves /metrics to the
metrics key), RequestIdMiddleware (request id), AccessMiddleware (client address, API key,
rate limits and their audit), BodyLimitMiddleware, then the router with strict request
schemas. Connections open when the server starts the app.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from redis.asyncio import Redis
from starlette.responses import JSONResponse

from libs.common import bus
from libs.common.audit import AuditPublisher
from libs.common.messages import AuditOutcome
from libs.common.store import connect_redis
from services.api import cache_purge
from services.api.access import AccessControl, AccessLimits
from services.api.auth import KeyRing
from services.api.errors import COMMON_ERROR_STATUSES, error_responses, install_error_handlers
from services.api.forwarded import ClientAddressResolver
from services.api.metrics import GatewayMetrics, MetricsKey, MetricsMiddleware
from services.api.middleware import AccessMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from services.api.passthrough import Forwarder
from services.api.ratelimit import (
    Backend,
    BucketSpec,
    RateLimiter,
    RedisBuckets,
    connect_limiter_redis,
)
from services.api.readiness import (
    SUPERVISOR_PROBE_TIMEOUT,
    FirewallStates,
    ProxyStates,
    Readiness,
    readiness,
    redis_answers,
)
from services.api.records import GatewayAgentStore, connect_read_redis
from services.api.routes import (
    Services,
    reject_unknown_query,
    require_api_key,
    router,
    services_of,
)
from services.api.schemas import Health
from services.api.settings import ApiSettings

logger = logging.getLogger(__name__)

SERVICE = "api"


def access_limits(settings: ApiSettings) -> AccessLimits:
    """Return the bucket sizes that `settings` configure."""
    return AccessLimits(
        client=BucketSpec(rate=settings.rate_limit, burst=settings.rate_limit_burst),
        key=BucketSpec(rate=settings.rate_limit, burst=settings.rate_limit_burst),
        overall=BucketSpec(rate=settings.global_rate_limit, burst=settings.global_rate_limit_burst),
        auth_failures=BucketSpec(
            rate=settings.auth_failure_rate_limit, burst=settings.auth_failure_rate_limit_burst
        ),
    )


def metrics_key_on_gateway_port(settings: ApiSettings) -> MetricsKey | None:
    """Return the key that opens /metrics on the gateway's port, or None when it has none.

    With --metrics-bind, metrics are served on that listener only.
    """
    if settings.metrics_api_key is None or settings.metrics_bind is not None:
        return None
    return MetricsKey(settings.metrics_api_key.get_secret_value())


def _freeze_startup_objects() -> None:
    # The app, its routes and their pydantic models are long-lived. Frozen, they are no longer
    # scanned by every full collection, which the garbage of each request triggers now and
    # then.
    gc.collect()
    gc.freeze()
    logger.info("moved %d start-up objects out of garbage collection", gc.get_freeze_count())


def _add_middleware(app: FastAPI, settings: ApiSettings, metrics: GatewayMetrics) -> None:
    # Starlette runs the middleware added last first.
    app.add_middleware(
        BodyLimitMiddleware,
        control_limit=int(settings.max_request_body),
        passthrough_limit=int(settings.max_passthrough_body),
    )
    app.add_middleware(AccessMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(
        MetricsMiddleware, metrics=metrics, key=metrics_key_on_gateway_port(settings)
    )


def _access_control(
    settings: ApiSettings, *, keyring: KeyRing, redis: Redis, audit: AuditPublisher
) -> AccessControl:
    """Return the access control of `settings`, counting in `redis` and auditing to `audit`."""

    def on_backend_change(backend: Backend, detail: str) -> None:
        audit.emit(
            "ratelimit.backend_changed",
            outcome=AuditOutcome.INFO,
            actor=SERVICE,
            reason_code=f"counting_{backend.value}",
            details={"backend": backend.value, "detail": detail},
        )

    return AccessControl(
        keyring=keyring,
        limiter=RateLimiter(
            RedisBuckets(redis, key_prefix=settings.rate_limit_key_prefix),
            on_backend_change=on_backend_change,
        ),
        resolver=ClientAddressResolver(settings.trusted_proxies, header=settings.forwarded_header),
        limits=access_limits(settings),
        audit=audit,
    )


def create_app(
    settings: ApiSettings, *, keyring: KeyRing, metrics: GatewayMetrics | None = None
) -> FastAPI:
    """Return the gateway app; connections open when the server starts it.

    `metrics` is shared with the --metrics-bind listener when main creates one.
    """
    metrics = metrics or GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nats = await bus.connect(settings, name=f"{SERVICE}@{settings.host_id}")
        audit = AuditPublisher(
            await bus.ensure_audit_stream(nats), service=SERVICE, host=settings.host_id
        )
        audit.start()
        reads_redis = connect_read_redis(settings)
        store = GatewayAgentStore(
            connect_redis(settings), reads=reads_redis, read_timeout=settings.nats_timeout
        )
        await store.ping()
        firewall = FirewallStates()
        await firewall.follow(nats)
        app.state.firewall = firewall
        metrics.states.follow(store=store, firewall=firewall)
        proxies = ProxyStates()
        await proxies.follow(nats)
        app.state.proxies = proxies
        limiter_redis = connect_limiter_redis(settings)
        access = _access_control(settings, keyring=keyring, redis=limiter_redis, audit=audit)
        access.start()
        app.state.access = access
        forwarder = Forwarder(
            timeout=settings.request_timeout,
            max_response=int(settings.max_passthrough_response),
        )
        app.state.services = Services(
            settings=settings,
            keyring=keyring,
            store=store,
            nats=nats,
            audit=audit,
            forwarder=forwarder,
        )
        settings.warn_if_relaxed()
        audit.emit(
            "service.started",
            outcome=AuditOutcome.INFO,
            actor=SERVICE,
            details={
                "settings": settings.redacted(),
                "api_keys": len(keyring),
                "api_key_ids": keyring.key_ids,
                "relaxed": list(settings.relaxed_settings()),
            },
        )
        logger.info(
            "gateway listening on %s:%s with %d API keys",
            settings.listen_address,
            settings.listen_port,
            len(keyring),
        )
        _freeze_startup_objects()
        try:
            yield
        finally:
            logger.info("gateway stopping")
            await access.close()
            audit.emit("service.stopped", outcome=AuditOutcome.INFO, actor=SERVICE)
            await forwarder.close()
            await limiter_redis.aclose()
            await reads_redis.aclose()
            await audit.close()
            await nats.drain()
            logger.info("gateway stopped")

    app = FastAPI(
        title="Agent Runner",
        version="1",
        summary="Run untrusted AI-agent containers behind an authenticated gateway.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # Routes under /v1 check the query through require_caller. The routes defined below
        # name reject_unknown_query themselves, and so must any route added here.
        responses=error_responses(*COMMON_ERROR_STATUSES),
    )
    install_error_handlers(app)
    _add_middleware(app, settings, metrics)
    app.include_router(router)
    app.include_router(cache_purge.router)

    @app.get(
        "/healthz",
        response_model=Health,
        tags=["health"],
        dependencies=[Depends(reject_unknown_query)],
    )
    async def healthz() -> Health:
        """Liveness check; needs no key, reveals nothing else and is rate-limited per address."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness}},
        tags=["health"],
        dependencies=[Depends(reject_unknown_query), Depends(require_api_key)],
    )
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: NATS, Redis, and each host's firewall, supervisor and proxy; needs a key."""
        services = services_of(request)
        return await readiness(
            nats=services.nats,
            redis_ok=await redis_answers(services.store.ping()),
            firewall=request.app.state.firewall,
            proxies=request.app.state.proxies,
            limiter_backend=request.app.state.access.limiter.backend,
            probe_timeout=min(services.settings.nats_timeout, SUPERVISOR_PROBE_TIMEOUT),
        )

    @app.get(
        "/openapi.json",
        include_in_schema=False,
        dependencies=[Depends(reject_unknown_query), Depends(require_api_key)],
    )
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    return app
