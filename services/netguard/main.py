"""Netguard entry point: apply the sandbox firewall, keep it verified, publish its state.

Pipeline: settings and logging, NATS and the audit stream, Redis (the registry of agent
addresses survives restarts there), removal of tables a crashed run left, apply, then a loop
that checks the live ruleset every `--firewall-check-interval` seconds, repairs drift and
publishes the result on `netguard.v1.host.<host>.state`. The supervisor starts agents only
while that state is fresh and verified. If the firewall cannot be applied, netguard exits
non-zero, so no verified state is published and no agent starts. On SIGTERM it removes its
tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from libs.common import bus, logs
from libs.common.audit import AuditPublisher
from libs.common.errors import BusError, CommonError, ConfigurationError
from libs.common.messages import (
    AuditOutcome,
    ErrorReply,
    FirewallState,
    RegisterAgentReply,
    RegisterAgentRequest,
    firewall_agents_subject,
    firewall_state_subject,
    utc_now,
)
from libs.common.registry import AgentRegistry
from libs.common.settings import load_settings
from libs.common.store import connect_redis
from services.netguard import metrics
from services.netguard.firewall import CheckResult, Firewall
from services.netguard.nft import FirewallError, Nft
from services.netguard.ruleset import RulesetConfig
from services.netguard.settings import NetguardSettings

logger = logging.getLogger(__name__)

SERVICE = "netguard"


class Netguard:
    """One host's firewall service."""

    def __init__(
        self,
        settings: NetguardSettings,
        *,
        nats: NatsClient,
        audit: AuditPublisher,
        registry: AgentRegistry,
        firewall: Firewall | None,
    ) -> None:
        self.settings = settings
        self.nats = nats
        self.audit = audit
        self.registry = registry
        self.firewall = firewall
        self._lock = asyncio.Lock()

    async def publish(self, result: CheckResult | None, *, detail: str = "") -> None:
        """Publish the firewall state and export it as metrics; disabled is never 'verified'."""
        metrics.FIREWALL_ENABLED.set(1 if self.firewall is not None else 0)
        metrics.FIREWALL_VERIFIED.set(1 if result and result.verified else 0)
        if self.firewall is not None:
            metrics.FIREWALL_AGENTS.set(len(self.firewall.agents))
            try:
                metrics.record_counters(await asyncio.to_thread(self.firewall.counters))
            except FirewallError as exc:
                logger.warning("cannot read rule counters: %s", exc)
        state = FirewallState(
            correlation_id=f"netguard-{self.settings.host_id}",
            host_id=self.settings.host_id,
            enabled=self.firewall is not None,
            verified=bool(result and result.verified),
            ruleset_hash=result.ruleset_hash if result else None,
            checked_at=utc_now(),
            check_interval=self.settings.firewall_check_interval,
            detail=detail,
        )
        try:
            await self.nats.publish(
                firewall_state_subject(self.settings.host_id), bus.encode(state)
            )
        except Exception as exc:  # the next check publishes again
            logger.warning("cannot publish firewall state: %s", exc)

    async def check_and_repair(self) -> CheckResult:
        """Check the live firewall; on drift, audit what changed and apply it again."""
        assert self.firewall is not None
        async with self._lock:
            result = await asyncio.to_thread(self.firewall.check)
            if result.verified:
                return result
            logger.warning("firewall drift: %s; applying the ruleset again", result.drift)
            metrics.FIREWALL_DRIFT.inc()
            self.audit.emit(
                "firewall.drift",
                outcome=AuditOutcome.FAILURE,
                actor=SERVICE,
                reason_code="ruleset_drift",
                details={"drift": result.drift, "live_hash": result.ruleset_hash},
            )
            digest = await asyncio.to_thread(self.firewall.apply)
            self.audit.emit(
                "firewall.applied",
                outcome=AuditOutcome.SUCCESS,
                actor=SERVICE,
                reason_code="drift_repaired",
                details={"ruleset_hash": digest},
            )
            return await asyncio.to_thread(self.firewall.check)

    async def handle_registration(self, msg: Msg) -> None:
        """Add or remove an agent's address; replies only after nftables has the change."""
        try:
            request = bus.decode(msg.data, RegisterAgentRequest, subject=msg.subject)
        except BusError as exc:
            logger.warning("invalid registration: %s", exc)
            await bus.respond(
                msg, ErrorReply(correlation_id="invalid", code="invalid_request", message=str(exc))
            )
            return
        policy = request.policy
        with logs.correlation_scope(request.correlation_id):
            try:
                async with self._lock:
                    if self.firewall is not None:
                        if request.add:
                            await asyncio.to_thread(self.firewall.add_agent, policy)
                        else:
                            await asyncio.to_thread(self.firewall.remove_agent, policy.address)
                    if request.add:
                        await self.registry.put(policy)
                    else:
                        await self.registry.delete(policy.address)
            except (FirewallError, CommonError) as exc:
                logger.error(
                    "registration of %s failed: %s",
                    policy.agent_id,
                    exc,
                    extra={logs.AGENT_ID: policy.agent_id},
                )
                await bus.respond(
                    msg,
                    ErrorReply(
                        correlation_id=request.correlation_id,
                        code="firewall_error",
                        message=str(exc),
                    ),
                )
                return
            self.audit.emit(
                "firewall.policy_added" if request.add else "firewall.policy_removed",
                outcome=AuditOutcome.SUCCESS,
                actor=SERVICE,
                agent_id=policy.agent_id,
                details=policy.model_dump(),
            )
            count = len(self.firewall.agents) if self.firewall else len(await self.registry.all())
            await bus.respond(
                msg, RegisterAgentReply(correlation_id=request.correlation_id, agents=count)
            )


async def run(settings: NetguardSettings) -> None:
    """Run netguard until SIGTERM or SIGINT; raises FirewallError when it cannot protect."""
    settings.warn_if_relaxed()
    nats = await bus.connect(settings, name=f"{SERVICE}@{settings.host_id}")
    audit = AuditPublisher(
        await bus.ensure_audit_stream(nats), service=SERVICE, host=settings.host_id
    )
    audit.start()
    registry = AgentRegistry(connect_redis(settings), host_id=settings.host_id)
    if settings.metrics_port:
        metrics.serve(str(settings.metrics_address), settings.metrics_port)
        logger.info(
            "metrics on http://%s:%d/metrics", settings.metrics_address, settings.metrics_port
        )
    audit.emit(
        "service.started",
        outcome=AuditOutcome.INFO,
        actor=SERVICE,
        details={"settings": settings.redacted()},
    )
    try:
        firewall = None
        if settings.disable_firewall:
            logger.warning(
                "firewall: disabled (--disable-firewall); agents can reach the internet, the "
                "host and each other"
            )
            audit.emit(
                "firewall.disabled",
                outcome=AuditOutcome.INFO,
                actor=SERVICE,
                reason_code="disabled_by_operator",
            )
        else:
            firewall = await asyncio.to_thread(_prepare_firewall, settings)
            firewall.agents = {policy.address: policy for policy in await registry.all()}
            digest = await asyncio.to_thread(firewall.apply)
            audit.emit(
                "firewall.applied",
                outcome=AuditOutcome.SUCCESS,
                actor=SERVICE,
                details={"ruleset_hash": digest, "agents": len(firewall.agents)},
            )
        guard = Netguard(settings, nats=nats, audit=audit, registry=registry, firewall=firewall)
        await _serve(guard)
    except FirewallError as exc:
        audit.emit(
            "firewall.failed",
            outcome=AuditOutcome.FAILURE,
            actor=SERVICE,
            reason_code="apply_failed",
            details={"error": str(exc)},
        )
        raise
    finally:
        await audit.close()
        await nats.drain()


def _prepare_firewall(settings: NetguardSettings) -> Firewall:
    firewall = Firewall(
        Nft(),
        RulesetConfig(
            table=settings.firewall_table,
            bridge=settings.sandbox_bridge,
            subnet=settings.sandbox_subnet,
            gateway=settings.gateway_address,
            transparent_port=settings.proxy_transparent_port,
            dns_port=settings.proxy_dns_port,
            explicit_port=settings.proxy_explicit_port,
        ),
    )
    stale = firewall.tables_present()
    if stale:
        logger.warning("replacing tables %s left by an earlier run", stale)
    return firewall


async def _serve(guard: Netguard) -> None:
    settings = guard.settings
    subscription = await guard.nats.subscribe(
        firewall_agents_subject(settings.host_id), cb=guard.handle_registration
    )
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    logger.info("netguard %s started", settings.host_id)
    while not stopped.is_set():
        if guard.firewall is None:
            await guard.publish(None, detail="firewall: disabled")
        else:
            try:
                result = await guard.check_and_repair()
            except FirewallError as exc:
                logger.error("firewall check failed: %s", exc)
                result = CheckResult(verified=False, ruleset_hash=None, drift={"error": str(exc)})
            await guard.publish(result, detail="" if result.verified else str(result.drift))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), settings.firewall_check_interval)
    logger.info("netguard %s stopping; removing its tables", settings.host_id)
    await subscription.unsubscribe()
    if guard.firewall is not None:
        await asyncio.to_thread(guard.firewall.remove)
        guard.audit.emit(
            "firewall.removed", outcome=AuditOutcome.INFO, actor=SERVICE, reason_code="shutdown"
        )
    await guard.publish(None, detail="netguard stopped")
    guard.audit.emit("service.stopped", outcome=AuditOutcome.INFO, actor=SERVICE)
    logger.info("netguard %s stopped", settings.host_id)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `agent-runner-netguard`."""
    try:
        settings = load_settings(NetguardSettings, sys.argv[1:] if argv is None else argv)
    except ConfigurationError as exc:
        print(f"agent-runner-netguard: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure_logging(service=SERVICE, host=settings.host_id, level=settings.log_level)
    try:
        asyncio.run(run(settings))
    except FirewallError as exc:
        logger.critical("netguard cannot apply the firewall, so no agent may start: %s", exc)
        sys.exit(1)
    except CommonError as exc:
        logger.critical("netguard cannot run: %s", exc)
        sys.exit(1)
