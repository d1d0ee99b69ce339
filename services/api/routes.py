"""Routes under /v1: agent lifecycle, logs and the HTTP passthrough; all need an API key."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

import nats.errors
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.routing import APIRoute
from nats.aio.client import Client as NatsClient
from starlette.responses import Response

from libs.common import bus, logs
from libs.common.audit import AuditPublisher
from libs.common.errors import BusError, BusTimeout, RemoteError
from libs.common.messages import (
    FINAL_STATES,
    SUBJECT_START,
    AgentRecord,
    AgentRecordReply,
    AgentState,
    AgentStateChanged,
    AuditOutcome,
    LogsReply,
    LogsRequest,
    StartAgentReply,
    StartAgentRequest,
    StopAgentRequest,
    StopReason,
    host_subject,
    new_agent_id,
    state_subject,
    utc_now,
)
from libs.common.store import AgentStore
from services.api.auth import KeyRing
from services.api.errors import (
    COMMON_ERROR_STATUSES,
    UNAUTHORIZED_MESSAGE,
    ApiError,
    error_responses,
)
from services.api.passthrough import Forwarder
from services.api.schemas import AgentList, AgentLogs, AgentView, CreateAgentRequest
from services.api.settings import ApiSettings

logger = logging.getLogger(__name__)

_AGENT_ID = re.compile(r"ag-[0-9a-f]{32}")
# Longer than any agent id, so a longer one is a mistake that gets 422 instead of 404.
MAX_AGENT_ID_LENGTH = 64
# A stop may wait for a start in progress (10 s) and then for the container to stop.
STOP_REPLY_EXTRA_SECONDS = 30.0
PASSTHROUGH_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass
class Services:
    """Connections and helpers shared by every request."""

    settings: ApiSettings
    keyring: KeyRing
    store: AgentStore
    nats: NatsClient
    audit: AuditPublisher
    forwarder: Forwarder


def services_of(request: Request) -> Services:
    """Return the shared services of the running app."""
    services: Services = request.app.state.services
    return services


async def require_api_key(request: Request) -> str:
    """Return the id of the caller's API key, which the access middleware has checked.

    The middleware (services/api/access.py) answers 401 to every request without a valid key
    before routing, and audits it. Raising here as well keeps a route closed if it is ever
    served without that middleware.
    """
    key_id = getattr(request.state, "key_id", None)
    if not isinstance(key_id, str) or not key_id:
        raise ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE)
    return key_id


@dataclass(frozen=True)
class Caller:
    """The id of the request's checked API key and the shared services."""

    key_id: str
    services: Services


async def require_caller(request: Request) -> Caller:
    """Check the query and the key, then return the caller's key id and the shared services.

    Raises ApiError 422 for an unknown query parameter (`reject_unknown_query`), then 401
    without a key (`require_api_key`). Routes get all of it through this one dependency
    because FastAPI spends about 9 µs of CPU per dependency and request on the benchmark
    machine (docs/benchmarks.md). It is `async def` because FastAPI runs a plain `def`
    dependency in a worker thread.
    """
    await reject_unknown_query(request)
    return Caller(key_id=await require_api_key(request), services=services_of(request))


def _declared_query_names(route: APIRoute) -> frozenset[str]:
    names: set[str] = set()
    pending = [route.dependant]
    while pending:
        dependant = pending.pop()
        names.update(field.alias for field in dependant.query_params)
        pending.extend(dependant.dependencies)
    return frozenset(names)


async def reject_unknown_query(request: Request) -> None:
    """Raise ApiError 422 for a query parameter that the route does not declare.

    A misspelt parameter such as `?wiat=true` would otherwise be ignored without a word.
    The passthrough is exempt because its query belongs to the agent.
    """
    if not request.scope.get("query_string"):
        # Most requests have no query, and walking the route's dependencies takes time.
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or route.endpoint is passthrough:
        return
    declared = _declared_query_names(route)
    unknown = sorted({name for name in request.query_params if name not in declared})
    if unknown:
        accepted = ", ".join(sorted(declared)) or "none"
        raise ApiError(
            422,
            "invalid_request",
            f"unknown query parameter {unknown[0][:64]!r} on {route.path}; accepted: {accepted}",
        )


CallerDep = Annotated[Caller, Depends(require_caller)]
AgentIdPath = Annotated[
    str, Path(max_length=MAX_AGENT_ID_LENGTH, description="'ag-' and 32 lower-case hex digits.")
]
router = APIRouter(prefix="/v1", tags=["agents"])


async def _record_or_404(services: Services, agent_id: str) -> AgentRecord:
    record = await services.store.get(agent_id) if _AGENT_ID.fullmatch(agent_id) else None
    if record is None:
        raise ApiError(404, "agent_not_found", f"no agent with id {agent_id!r}")
    return record


@router.post("/agents", status_code=202, response_model=AgentView, responses=error_responses(503))
async def create_agent(
    body: CreateAgentRequest,
    caller: CallerDep,
    wait: Annotated[
        bool, Query(description="Respond only once the agent is ready or failed.")
    ] = False,
) -> AgentView:
    """Start an agent; it is `requested` at once and `ready` once it responds to HTTP."""
    key_id, services = caller.key_id, caller.services
    settings = services.settings
    if urlsplit(body.image_url).scheme == "http" and not settings.allow_http_image_urls:
        raise ApiError(
            422,
            "invalid_request",
            "image_url must use https://; http:// is accepted only in the development profile",
        )
    lifetime = body.lifetime_seconds or settings.max_container_lifetime
    if lifetime > settings.max_container_lifetime:
        raise ApiError(
            422,
            "invalid_request",
            f"lifetime_seconds {lifetime} is over the maximum of {settings.max_container_lifetime}",
        )
    correlation_id = str(logs.current_correlation_id())
    record = AgentRecord(
        agent_id=new_agent_id(),
        state=AgentState.REQUESTED,
        image_url=body.image_url,
        image_digest=body.image_digest,
        lifetime_seconds=lifetime,
        correlation_id=correlation_id,
        created_at=utc_now(),
        allowed_domains=body.allowed_domains,
    )
    await services.store.create(record)
    services.audit.emit(
        "agent.requested",
        outcome=AuditOutcome.SUCCESS,
        actor=key_id,
        agent_id=record.agent_id,
        details={
            "image_url": record.image_url,
            "image_digest": record.image_digest,
            "lifetime_seconds": lifetime,
            "env_names": sorted(body.env),
            "allowed_domains": record.allowed_domains,
        },
    )
    subscription = await services.nats.subscribe(state_subject(record.agent_id)) if wait else None
    try:
        await _send_start(services, record, body)
        if subscription is not None:
            await _wait_until_settled(services, record.agent_id, subscription)
    finally:
        if subscription is not None:
            await subscription.unsubscribe()
    return AgentView.of(await _record_or_404(services, record.agent_id))


async def _send_start(services: Services, record: AgentRecord, body: CreateAgentRequest) -> None:
    request = StartAgentRequest(
        correlation_id=record.correlation_id,
        agent_id=record.agent_id,
        image_url=record.image_url,
        image_digest=record.image_digest,
        lifetime_seconds=record.lifetime_seconds,
        env=body.env,
        allowed_domains=record.allowed_domains,
        image_signature=body.image_signature,
        image_bundle=body.image_bundle,
    )
    try:
        await bus.request(
            services.nats,
            SUBJECT_START,
            request,
            StartAgentReply,
            timeout=services.settings.nats_timeout,
        )
    except (BusTimeout, RemoteError, BusError) as exc:
        logger.error(
            "start of %s not accepted: %s",
            record.agent_id,
            exc,
            extra={logs.AGENT_ID: record.agent_id},
        )
        current = await services.store.get(record.agent_id)
        if current is not None and current.state == AgentState.REQUESTED:
            current.state = AgentState.FAILED
            current.failure_reason = "supervisor_unavailable"
            current.failure_message = str(exc)
            current.stop_reason = StopReason.FAILED
            current.stopped_at = utc_now()
            await services.store.put(current)
        raise ApiError(
            503,
            "supervisor_unavailable",
            f"no supervisor accepted agent {record.agent_id}; try again later",
        ) from exc


async def _wait_until_settled(services: Services, agent_id: str, subscription: object) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + services.settings.start_wait_timeout
    while (remaining := deadline - loop.time()) > 0:
        try:
            message = await subscription.next_msg(timeout=min(1.0, remaining))  # type: ignore[attr-defined]
            state = bus.decode(message.data, AgentStateChanged).record.state
        except (nats.errors.TimeoutError, BusError):
            # State notices are not durable; Redis is the source of truth.
            record = await services.store.get(agent_id)
            state = record.state if record else AgentState.FAILED
        if state == AgentState.READY or state in FINAL_STATES:
            return


@router.get("/agents", response_model=AgentList, responses=error_responses(503))
async def list_agents(caller: CallerDep) -> AgentList:
    """List agents, newest first."""
    services = caller.services
    records = await services.store.list_recent(limit=services.settings.max_listed_agents)
    return AgentList(agents=[AgentView.of(record) for record in records])


@router.get("/agents/{agent_id}", response_model=AgentView, responses=error_responses(404, 503))
async def get_agent(agent_id: AgentIdPath, caller: CallerDep) -> AgentView:
    """Return one agent, including why it stopped or failed."""
    return AgentView.of(await _record_or_404(caller.services, agent_id))


@router.delete(
    "/agents/{agent_id}", response_model=AgentView, responses=error_responses(404, 409, 503)
)
async def delete_agent(agent_id: AgentIdPath, caller: CallerDep) -> AgentView:
    """Stop an agent and remove its container; its record stays readable."""
    key_id, services = caller.key_id, caller.services
    record = await _record_or_404(services, agent_id)
    if record.state in FINAL_STATES:
        return AgentView.of(record)
    services.audit.emit(
        "agent.stop_requested", outcome=AuditOutcome.SUCCESS, actor=key_id, agent_id=agent_id
    )
    if record.host_id is None:
        raise ApiError(409, "agent_not_started", f"agent {agent_id} has not been accepted yet")
    try:
        reply = await bus.request(
            services.nats,
            host_subject(record.host_id, "stop"),
            StopAgentRequest(correlation_id=str(logs.current_correlation_id()), agent_id=agent_id),
            AgentRecordReply,
            timeout=services.settings.nats_timeout + STOP_REPLY_EXTRA_SECONDS,
        )
    except BusError as exc:
        raise ApiError(
            503, "supervisor_unavailable", f"supervisor {record.host_id} did not stop {agent_id}"
        ) from exc
    return AgentView.of(reply.record)


@router.get(
    "/agents/{agent_id}/logs", response_model=AgentLogs, responses=error_responses(404, 503)
)
async def agent_logs(
    agent_id: AgentIdPath,
    caller: CallerDep,
    tail: Annotated[int, Query(gt=0, le=10_000, description="Number of lines.")] = 100,
) -> AgentLogs:
    """Return the last lines of an agent's output, sanitised."""
    services = caller.services
    record = await _record_or_404(services, agent_id)
    if record.host_id is None:
        return AgentLogs(agent_id=agent_id, lines=[])
    try:
        reply = await bus.request(
            services.nats,
            host_subject(record.host_id, "logs"),
            LogsRequest(
                correlation_id=str(logs.current_correlation_id()), agent_id=agent_id, tail=tail
            ),
            LogsReply,
            timeout=services.settings.nats_timeout,
        )
    except BusError as exc:
        raise ApiError(
            503, "supervisor_unavailable", f"supervisor {record.host_id} did not send logs"
        ) from exc
    return AgentLogs(agent_id=agent_id, lines=reply.lines, counts=reply.counts)


async def passthrough(
    agent_id: AgentIdPath, path: str, request: Request, caller: CallerDep
) -> Response:
    """Forward the request to the agent's port 80 and stream its response back."""
    services = caller.services
    record = await _record_or_404(services, agent_id)
    if record.state != AgentState.READY:
        raise ApiError(
            409, "agent_not_ready", f"agent {agent_id} is {record.state.value}, not ready"
        )
    prefix = f"/v1/agents/{agent_id}/http".encode()
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    forwarded = raw_path[len(prefix) :] if raw_path.startswith(prefix) else path.encode()
    return await services.forwarder.forward(request, record, forwarded)


# The agent may send any status itself, so a status that the gateway also uses here carries
# either the gateway's ErrorBody or the agent's own body, of any media type.
_PASSTHROUGH_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {
        "description": f"{response['description']} Or the agent's own response with this status.",
        "content": {"*/*": {}},
    }
    for status, response in error_responses(*COMMON_ERROR_STATUSES, 404, 409, 502, 504).items()
}
_PASSTHROUGH_RESPONSES["default"] = {"description": "The agent's response, streamed as it sent it."}

# One route per method, so that each has its own OpenAPI operation id.
for _method in PASSTHROUGH_METHODS:
    router.add_api_route(
        "/agents/{agent_id}/http/{path:path}",
        passthrough,
        methods=[_method],
        operation_id=f"passthrough_{_method.lower()}",
        response_class=Response,
        responses=_PASSTHROUGH_RESPONSES,
    )
