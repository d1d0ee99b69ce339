"""`GET /readyz`: whether the gateway's dependencies and each host's firewall are usable.

The gateway follows every netguard's published state, so an operator sees from one place
which hosts run with a verified firewall, with `--disable-firewall` ('disabled'), or with
none that is fresh ('stale', 'unverified'). The route needs an API key because the answer
describes the deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from datetime import timedelta
from typing import Literal

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import BaseModel
from starlette.responses import JSONResponse

from libs.common import bus
from libs.common.errors import BusError, StoreError
from libs.common.messages import FirewallState, utc_now

logger = logging.getLogger(__name__)

STATE_SUBJECTS = "netguard.v1.host.*.state"
STALE_AFTER_INTERVALS = 3

FirewallStatus = Literal["verified", "disabled", "unverified", "stale"]


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
        now = utc_now()
        result: dict[str, FirewallStatus] = {}
        for host, state in sorted(self.states.items()):
            limit = timedelta(seconds=state.check_interval * STALE_AFTER_INTERVALS)
            if now - state.checked_at > limit:
                result[host] = "stale"
            elif not state.enabled:
                result[host] = "disabled"
            else:
                result[host] = "verified" if state.verified else "unverified"
        return result


class Readiness(BaseModel):
    """Response body of /readyz."""

    status: Literal["ready", "not_ready"]
    nats: Literal["ok", "down"]
    redis: Literal["ok", "down"]
    firewall: dict[str, FirewallStatus]


async def readiness(*, nats: NatsClient, redis_ok: bool, firewall: FirewallStates) -> JSONResponse:
    """Return 200 when NATS and Redis respond and some host's firewall is usable, else 503."""
    firewall_status = firewall.status()
    usable = any(status in ("verified", "disabled") for status in firewall_status.values())
    nats_ok = nats.is_connected
    ready = nats_ok and redis_ok and usable
    body = Readiness(
        status="ready" if ready else "not_ready",
        nats="ok" if nats_ok else "down",
        redis="ok" if redis_ok else "down",
        firewall=firewall_status,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


async def redis_answers(ping: Awaitable[None]) -> bool:
    """Return whether a Redis ping succeeds."""
    try:
        await ping
    except StoreError:
        return False
    return True
