"""`GET /readyz`: whether the gateway's dependencies and each host's services are usable.

The gateway follows what every host's netguard and proxy publish on NATS. An operator sees
from one place which hosts run with a verified firewall, with `--disable-firewall`
('disabled'), or with none that is fresh ('stale', 'unverified'), and whether their proxy
runs. Supervisors publish nothing, so each host that a netguard announced is asked for the
logs of an agent id that no agent can have, because new ids are random UUID4s, whose version
digit is never 0. A supervisor that replies `agent_not_found` has its NATS subscriptions and
its Redis connection working. The route needs an API key because the answer describes the
deployment.

Each supervisor is also asked which OCI runtime its agents use and what its startup gVisor
probe found (`runtimes`). That is reported only: a supervisor started with --require-gvisor
does not run without gVisor, and one without it runs agents under runc or a failed runsc.

The gateway is ready when NATS and Redis respond and at least one host has a usable firewall
and a supervisor that replies. A host's proxy is reported but not required: without it,
agents start and their outbound requests fail closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Literal

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import BaseModel
from starlette.responses import JSONResponse

from libs.common import bus
from libs.common.errors import BusError, RemoteError, StoreError
from libs.common.messages import (
    FirewallState,
    LogsReply,
    LogsRequest,
    ProxyState,
    RuntimeStatusReply,
    RuntimeStatusRequest,
    host_subject,
    utc_now,
)
from services.api.ratelimit import Backend

logger = logging.getLogger(__name__)

STATE_SUBJECTS = "netguard.v1.host.*.state"
PROXY_STATE_SUBJECTS = "proxy.v1.host.*.state"
STALE_AFTER_INTERVALS = 3
# An agent id that new_agent_id() never returns, so a logs request for it touches no agent.
PROBE_AGENT_ID = "ag-" + "0" * 32
SUPERVISOR_PROBE_TIMEOUT = 2.0
# The store's client retries with backoff; /readyz reports a Redis that is slow to respond as down.
REDIS_PING_TIMEOUT = 2.0
# Hosts asked at most per /readyz call, so that one call sends a bounded number of requests.
MAX_PROBED_HOSTS = 64

FirewallStatus = Literal["verified", "disabled", "unverified", "stale"]
SupervisorStatus = Literal["ok", "down", "error"]
ProxyStatus = Literal["running", "stopped", "stale", "unknown"]


def _stale(published: datetime, interval: float) -> bool:
    return utc_now() - published > timedelta(seconds=interval * STALE_AFTER_INTERVALS)


class FirewallStates:
    """The latest firewall state published by each host's netguard."""

    def __init__(self) -> None:
        self.states: dict[str, FirewallState] = {}

    async def follow(self, nats: NatsClient) -> None:
        """Subscribe to every host's firewall state."""
        await nats.subscribe(STATE_SUBJECTS, cb=self._on_state)

    async def _on_state(self, msg: Msg) -> None:
        try:
            state = bus.decode(msg.data, FirewallState, subject=msg.subject)
        except BusError as exc:
            logger.warning("ignoring invalid firewall state: %s", exc)
            return
        self.states[state.host_id] = state

    def status(self) -> dict[str, FirewallStatus]:
        """Return each known host's firewall status now."""
        result: dict[str, FirewallStatus] = {}
        for host, state in sorted(self.states.items()):
            if _stale(state.checked_at, state.check_interval):
                result[host] = "stale"
            elif not state.enabled:
                result[host] = "disabled"
            else:
                result[host] = "verified" if state.verified else "unverified"
        return result


class ProxyStates:
    """The latest state published by each host's egress proxy."""

    def __init__(self) -> None:
        self.states: dict[str, ProxyState] = {}

    async def follow(self, nats: NatsClient) -> None:
        """Subscribe to every host's proxy state."""
        await nats.subscribe(PROXY_STATE_SUBJECTS, cb=self._on_state)

    async def _on_state(self, msg: Msg) -> None:
        try:
            state = bus.decode(msg.data, ProxyState, subject=msg.subject)
        except BusError as exc:
            logger.warning("ignoring invalid proxy state: %s", exc)
            return
        self.states[state.host_id] = state

    def status(self, hosts: list[str]) -> dict[str, ProxyStatus]:
        """Return the proxy status of `hosts` and of every host whose proxy published."""
        result: dict[str, ProxyStatus] = {host: "unknown" for host in hosts}
        for host, state in self.states.items():
            if _stale(state.published_at, state.publish_interval):
                result[host] = "stale"
            else:
                result[host] = "running" if state.running else "stopped"
        return dict(sorted(result.items()))


async def probe_supervisor(nats: NatsClient, host_id: str, *, timeout: float) -> SupervisorStatus:
    """Ask the supervisor of `host_id` for the logs of PROBE_AGENT_ID and judge its reply."""
    request = LogsRequest(correlation_id="readiness-probe", agent_id=PROBE_AGENT_ID, tail=1)
    try:
        await bus.request(nats, host_subject(host_id, "logs"), request, LogsReply, timeout=timeout)
    except RemoteError as exc:
        return "ok" if exc.code == "agent_not_found" else "error"
    except BusError:
        return "down"
    # No agent has the probe id, so a LogsReply would be a supervisor bug.
    return "error"


async def probe_supervisors(
    nats: NatsClient, hosts: list[str], *, timeout: float
) -> dict[str, SupervisorStatus]:
    """Probe the supervisors of `hosts` (the first MAX_PROBED_HOSTS) in parallel."""
    probed = hosts[:MAX_PROBED_HOSTS]
    if not nats.is_connected:
        return dict.fromkeys(probed, "down")
    results = await asyncio.gather(
        *(probe_supervisor(nats, host, timeout=timeout) for host in probed)
    )
    return dict(zip(probed, results, strict=True))


class HostRuntime(BaseModel):
    """A host's agent runtime and gVisor probe result; `unknown` when its supervisor is silent."""

    runtime: Literal["runc", "runsc", "unknown"]
    gvisor_status: str


async def probe_runtime(nats: NatsClient, host_id: str, *, timeout: float) -> HostRuntime:
    """Ask the supervisor of `host_id` for its runtime status."""
    request = RuntimeStatusRequest(correlation_id="readiness-probe")
    try:
        reply = await bus.request(
            nats, host_subject(host_id, "runtime"), request, RuntimeStatusReply, timeout=timeout
        )
    except BusError:
        return HostRuntime(runtime="unknown", gvisor_status="unknown")
    return HostRuntime(runtime=reply.runtime, gvisor_status=reply.gvisor_status)


async def probe_runtimes(
    nats: NatsClient, hosts: list[str], *, timeout: float
) -> dict[str, HostRuntime]:
    """Ask the supervisors of `hosts` (the first MAX_PROBED_HOSTS) for their runtime status."""
    probed = hosts[:MAX_PROBED_HOSTS]
    if not nats.is_connected:
        return dict.fromkeys(probed, HostRuntime(runtime="unknown", gvisor_status="unknown"))
    results = await asyncio.gather(*(probe_runtime(nats, host, timeout=timeout) for host in probed))
    return dict(zip(probed, results, strict=True))


class Readiness(BaseModel):
    """Response body of /readyz.

    `rate_limiter` is `redis` when rate limits are shared through Redis and `local` while
    Redis fails and each gateway process counts on its own.
    """

    status: Literal["ready", "not_ready"]
    nats: Literal["ok", "down"]
    redis: Literal["ok", "down"]
    rate_limiter: Literal["redis", "local"]
    firewall: dict[str, FirewallStatus]
    supervisors: dict[str, SupervisorStatus]
    runtimes: dict[str, HostRuntime]
    proxies: dict[str, ProxyStatus]


async def readiness(
    *,
    nats: NatsClient,
    redis_ok: bool,
    firewall: FirewallStates,
    proxies: ProxyStates,
    limiter_backend: Backend,
    probe_timeout: float = SUPERVISOR_PROBE_TIMEOUT,
) -> JSONResponse:
    """Return 200 when the gateway can start agents (see the module docstring), else 503."""
    firewall_status = firewall.status()
    hosts = list(firewall_status)
    supervisors, runtimes = await asyncio.gather(
        probe_supervisors(nats, hosts, timeout=probe_timeout),
        probe_runtimes(nats, hosts, timeout=probe_timeout),
    )
    usable = any(
        status in ("verified", "disabled") and supervisors.get(host) == "ok"
        for host, status in firewall_status.items()
    )
    nats_ok = nats.is_connected
    ready = nats_ok and redis_ok and usable
    body = Readiness(
        status="ready" if ready else "not_ready",
        nats="ok" if nats_ok else "down",
        redis="ok" if redis_ok else "down",
        rate_limiter=limiter_backend.value,
        firewall=firewall_status,
        supervisors=supervisors,
        runtimes=runtimes,
        proxies=proxies.status(hosts),
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


async def redis_answers(ping: Awaitable[None], *, timeout: float = REDIS_PING_TIMEOUT) -> bool:
    """Return whether a Redis ping succeeds within `timeout` seconds."""
    try:
        await asyncio.wait_for(ping, timeout)
    except (StoreError, TimeoutError):
        return False
    return True
