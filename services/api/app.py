"""The gateway application: middleware, error handlers, routes and shared connections."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.responses import JSONResponse

from libs.common import bus
from libs.common.audit import AuditPublisher
from libs.common.messages import AuditOutcome
from libs.common.store import AgentStore, connect_redis
from services.api import cache_purge
from services.api.auth import KeyRing
from services.api.errors import install_error_handlers
from services.api.middleware import RequestContextMiddleware
from services.api.passthrough import Forwarder
from services.api.readiness import FirewallStates, Readiness, readiness, redis_answers
from services.api.routes import Services, require_api_key, router, services_of
from services.api.schemas import Health
from services.api.settings import ApiSettings

logger = logging.getLogger(__name__)

SERVICE = "api"


def create_app(settings: ApiSettings, *, keyring: KeyRing) -> FastAPI:
    """Return the gateway app; connections open when the server starts it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nats = await bus.connect(settings, name=f"{SERVICE}@{settings.host_id}")
        audit = AuditPublisher(
            await bus.ensure_audit_stream(nats), service=SERVICE, host=settings.host_id
        )
        audit.start()
        store = AgentStore(connect_redis(settings))
        await store.ping()
        firewall = FirewallStates()
        await firewall.follow(nats)
        app.state.firewall = firewall
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
                "relaxed": list(settings.relaxed_settings()),
            },
        )
        logger.info(
            "gateway listening on %s:%s with %d API keys",
            settings.listen_address,
            settings.listen_port,
            len(keyring),
        )
        try:
            yield
        finally:
            logger.info("gateway stopping")
            audit.emit("service.stopped", outcome=AuditOutcome.INFO, actor=SERVICE)
            await forwarder.close()
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
    )
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        control_limit=int(settings.max_request_body),
        passthrough_limit=int(settings.max_passthrough_body),
    )
    app.include_router(router)
    app.include_router(cache_purge.router)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """Liveness check; needs no key and reveals nothing else."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness}},
        tags=["health"],
        dependencies=[Depends(require_api_key)],
    )
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: NATS, Redis and each host's firewall state; needs a key."""
        services = services_of(request)
        return await readiness(
            nats=services.nats,
            redis_ok=await redis_answers(services.store.ping()),
            firewall=request.app.state.firewall,
        )

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_api_key)])
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    return app
