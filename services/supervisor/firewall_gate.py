"""The supervisor's view of netguard: is the firewall verified, and agent registration.

An agent may start only while netguard's latest published state is fresh (no older than
three check intervals) and verified. A state from a netguard running with --disable-firewall
is accepted only by a supervisor in the development profile, and each such start is logged
and audited. Every agent's sandbox address is registered with netguard before the agent is
reported ready, so the firewall and the proxy know which agent sends a packet.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libs.common import bus
from libs.common.errors import BusError
from libs.common.messages import (
    AgentNetworkPolicy,
    FirewallState,
    RegisterAgentReply,
    RegisterAgentRequest,
    firewall_agents_subject,
    firewall_state_subject,
    utc_now,
)
from services.supervisor.errors import AgentStartError, FailureReason

logger = logging.getLogger(__name__)

STALE_AFTER_INTERVALS = 3


class FirewallGate:
    """Track netguard's state for this host and register agents with it."""

    def __init__(self, nats: NatsClient, *, host_id: str, allow_disabled: bool, timeout: float):
        self._nats = nats
        self._host_id = host_id
        self._allow_disabled = allow_disabled
        self._timeout = timeout
        self.state: FirewallState | None = None
        self._received_at = 0.0
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Subscribe to netguard's state for this host."""
        self._subscription = await self._nats.subscribe(
            firewall_state_subject(self._host_id), cb=self._on_state
        )

    async def close(self) -> None:
        """Stop following netguard's state."""
        if self._subscription is not None:
            await self._subscription.unsubscribe()

    async def _on_state(self, msg: Msg) -> None:
        try:
            state = bus.decode(msg.data, FirewallState, subject=msg.subject)
        except BusError as exc:
            logger.warning("ignoring invalid firewall state: %s", exc)
            return
        ahead = state.checked_at - utc_now()
        if ahead > timedelta(seconds=state.check_interval):
            logger.warning(
                "ignoring firewall state of %s dated %.0f s in the future; check the clocks",
                state.host_id,
                ahead.total_seconds(),
            )
            return
        if self.state is None or state.verified != self.state.verified:
            logger.info(
                "firewall state of %s: enabled=%s verified=%s %s",
                state.host_id,
                state.enabled,
                state.verified,
                state.detail,
            )
        self.state = state
        self._received_at = time.monotonic()

    def require_usable(self) -> bool:
        """Return True when the firewall is disabled but tolerated; raise if agents must wait.

        Raises AgentStartError(FIREWALL_NOT_VERIFIED) when no fresh verified state exists.
        """
        state = self.state
        if state is None:
            raise AgentStartError(
                FailureReason.FIREWALL_NOT_VERIFIED,
                f"no firewall state from netguard on host {self._host_id}; start "
                "agent-runner-netguard",
            )
        # Freshness counts from when this supervisor received the state, so a sender's clock
        # running ahead cannot keep an old state fresh.
        age = time.monotonic() - self._received_at
        if age > state.check_interval * STALE_AFTER_INTERVALS:
            raise AgentStartError(
                FailureReason.FIREWALL_NOT_VERIFIED,
                f"the last firewall state is {age:.0f} s old; netguard on "
                f"{self._host_id} is not running or cannot reach NATS",
            )
        if not state.enabled:
            if self._allow_disabled:
                return True
            raise AgentStartError(
                FailureReason.FIREWALL_NOT_VERIFIED,
                "netguard runs with --disable-firewall, which only the development profile accepts",
            )
        if not state.verified:
            raise AgentStartError(
                FailureReason.FIREWALL_NOT_VERIFIED,
                f"the firewall is not verified: {state.detail or 'no detail'}",
            )
        return False

    async def register(self, policy: AgentNetworkPolicy, *, add: bool, correlation_id: str) -> None:
        """Add or remove an agent at netguard; raises AgentStartError when it fails."""
        request = RegisterAgentRequest(correlation_id=correlation_id, add=add, policy=policy)
        try:
            await bus.request(
                self._nats,
                firewall_agents_subject(self._host_id),
                request,
                RegisterAgentReply,
                timeout=self._timeout,
            )
        except BusError as exc:
            raise AgentStartError(
                FailureReason.FIREWALL_NOT_VERIFIED,
                f"netguard did not {'register' if add else 'remove'} {policy.address}: {exc}",
            ) from exc
