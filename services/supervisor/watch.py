"""Reconciliation after a restart, and the loop that enforces lifetimes and limits.

Each round of `watch_agents` records the exits of ready agents and samples the resource use
of the running ones (monitor.py). It emits limit and lifetime warnings, and it stops agents
that hit a limit or outlived their lifetime, each with its typed stop reason.

Restart policy: a container labelled as ours for this host is adopted only when its agent's
record says 'ready', the container still runs and its lifetime has not ended; the supervisor
then keeps serving, watching and stopping it as if it had never restarted. Every other
labelled container is stopped and removed, and its record is closed: an agent caught in the
middle of a start fails with `supervisor_restarted`, a ready agent whose container has gone
fails with `container_missing`, and one that exited or expired is recorded as such. Nothing
is left orphaned: no container without a live record, and no active record without a
container.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from libs.common import logs
from libs.common.errors import StoreError
from libs.common.messages import FINAL_STATES, AgentRecord, AgentState, StopReason, utc_now
from libs.common.messages import AuditOutcome as Outcome
from services.supervisor import metrics
from services.supervisor.docker_adapter import ContainerStatus
from services.supervisor.errors import DockerUnavailable, FailureReason
from services.supervisor.lifecycle import ACTOR, AgentManager
from services.supervisor.monitor import Assessment

logger = logging.getLogger(__name__)


async def reconcile(manager: AgentManager) -> None:
    """Adopt or remove this host's containers and close records left open by a crash."""
    containers = await asyncio.to_thread(manager.docker.list_managed, manager.host_id)
    seen: set[str] = set()
    for container in containers:
        if container.agent_id:
            seen.add(container.agent_id)
        await _reconcile_container(manager, container)
    for agent_id in await manager.store.active_on_host(manager.host_id):
        if agent_id in seen:
            continue
        record = await manager.store.get(agent_id)
        if record is None:
            await manager.store.forget_active(manager.host_id, agent_id)
            continue
        if record.state in FINAL_STATES:
            continue
        if record.state == AgentState.STOPPING:
            await manager.finish(record, StopReason.REQUESTED, exit_code=record.exit_code)
            continue
        reason = (
            FailureReason.CONTAINER_MISSING
            if record.state == AgentState.READY
            else FailureReason.SUPERVISOR_RESTARTED
        )
        await manager.fail(record, reason, "no container found after supervisor restart")
    # Volumes of containers that someone removed without theirs (agents under runsc have two).
    await asyncio.to_thread(manager.docker.remove_dangling_volumes, manager.host_id)


async def _reconcile_container(manager: AgentManager, container: ContainerStatus) -> None:
    record = await manager.store.get(container.agent_id) if container.agent_id else None
    extra = {logs.AGENT_ID: container.agent_id, logs.CONTAINER_ID: container.container_id}
    if record is None or record.container_id != container.container_id:
        logger.warning(
            "removing container %s: no matching agent record",
            container.container_id[:12],
            extra=extra,
        )
        await asyncio.to_thread(manager.docker.remove, container.container_id)
        _audit_removed(manager, container, "no_agent_record")
        return
    if record.state in FINAL_STATES:
        logger.warning(
            "removing container %s of finished agent", container.container_id[:12], extra=extra
        )
        await asyncio.to_thread(manager.docker.remove, container.container_id)
        _audit_removed(manager, container, "agent_finished")
        return
    if record.state == AgentState.READY:
        expired = record.expires_at is not None and utc_now() >= record.expires_at
        if container.running and not expired:
            logger.info("adopted running agent %s", record.agent_id, extra=extra)
            manager.audit.emit(
                "agent.adopted",
                outcome=Outcome.SUCCESS,
                actor=ACTOR,
                agent_id=record.agent_id,
                correlation_id=record.correlation_id,
                details={"container_id": container.container_id},
            )
            return
        await manager.expire_or_collect(
            record, running=container.running, oom_killed=container.oom_killed
        )
        return
    if record.state == AgentState.STOPPING:
        await manager.terminate(record, StopReason.REQUESTED)
        return
    await manager.fail(
        record,
        FailureReason.SUPERVISOR_RESTARTED,
        f"supervisor restarted while the agent was {record.state.value}",
    )


def _audit_removed(manager: AgentManager, container: ContainerStatus, reason: str) -> None:
    manager.audit.emit(
        "agent.container_removed",
        outcome=Outcome.INFO,
        actor=ACTOR,
        agent_id=container.agent_id or None,
        reason_code=reason,
        details={"container_id": container.container_id, "running": container.running},
    )


async def watch_agents(manager: AgentManager) -> None:
    """Check exits, resource use and lifetimes of ready agents every `--monitor-interval` s."""
    while True:
        try:
            await _check_once(manager)
        except (DockerUnavailable, StoreError) as exc:
            logger.error("agent check failed: %s; retrying", exc)
        except Exception:
            logger.exception("agent check failed unexpectedly; retrying")
        await asyncio.sleep(manager.settings.monitor_interval)


async def _check_once(manager: AgentManager) -> None:
    ready: list[AgentRecord] = []
    for agent_id in await manager.store.active_on_host(manager.host_id):
        if manager.starting(agent_id):
            continue
        record = await manager.store.get(agent_id)
        if record is not None and record.state == AgentState.READY:
            ready.append(record)
    # The containers are listed after the records were read. An agent turns ready only after
    # its container was created, so a ready agent missing from this list has lost it.
    statuses = {
        status.agent_id: status
        for status in await asyncio.to_thread(manager.docker.list_managed, manager.host_id)
        if status.agent_id
    }

    running: list[AgentRecord] = []
    checks: dict[str, Callable[[], Awaitable[None]]] = {}
    for record in ready:
        agent_id = record.agent_id
        status = statuses.get(agent_id)
        if status is None or not status.running:
            oom_killed = status is not None and status.oom_killed
            checks[agent_id] = functools.partial(
                manager.expire_or_collect, record, running=False, oom_killed=oom_killed
            )
            continue
        running.append(record)

    containers = {record.agent_id: record.container_id for record in running if record.container_id}
    samples = await asyncio.to_thread(manager.monitor.sample_all, containers)

    for record in running:
        limit = None
        sample = samples.get(record.agent_id)
        if sample is not None:
            assessment = manager.monitor.assess(record.agent_id, sample)
            _emit_warnings(manager, record, assessment)
            limit = assessment.stop
        if limit is None:
            _warn_of_lifetime_end(manager, record)
        checks[record.agent_id] = functools.partial(
            manager.expire_or_collect, record, running=True, limit=limit
        )
    manager.monitor.publish()

    # Each stop waits up to --agent-stop-grace for its container, so the stops of one round
    # run concurrently and one slow stop does not delay the limits and lifetimes of others.
    results = await asyncio.gather(*(check() for check in checks.values()), return_exceptions=True)
    for agent_id, result in zip(checks, results, strict=True):
        if isinstance(result, (DockerUnavailable, StoreError)):
            logger.error(
                "check of agent %s failed: %s; retrying next round",
                agent_id,
                result,
                extra={logs.AGENT_ID: agent_id},
            )
        elif isinstance(result, Exception):
            logger.error(
                "check of agent %s failed unexpectedly; retrying next round",
                agent_id,
                exc_info=result,
                extra={logs.AGENT_ID: agent_id},
            )
        elif isinstance(result, BaseException):
            raise result


def _emit_warnings(manager: AgentManager, record: AgentRecord, assessment: Assessment) -> None:
    extra = {logs.AGENT_ID: record.agent_id, logs.CONTAINER_ID: record.container_id}
    for warning in assessment.warnings:
        metrics.LIMIT_WARNINGS.labels(resource=warning.resource.value).inc()
        logger.warning(
            "agent %s uses %.0f%% of its %s limit",
            record.agent_id,
            warning.fraction * 100,
            warning.resource.value,
            extra=extra,
        )
        manager.audit.emit(
            "agent.limit_warning",
            outcome=Outcome.INFO,
            actor=ACTOR,
            agent_id=record.agent_id,
            reason_code=f"{warning.resource.value}_limit_near",
            details=warning.details(),
        )
    if assessment.stop is not None:
        logger.warning(
            "stopping agent %s: %s: %s",
            record.agent_id,
            assessment.stop.value,
            assessment.detail,
            extra={**extra, logs.REASON: assessment.stop.value},
        )
        manager.audit.emit(
            "agent.limit_reached",
            outcome=Outcome.INFO,
            actor=ACTOR,
            agent_id=record.agent_id,
            reason_code=assessment.stop.value,
            details={"message": assessment.detail},
        )


def _warn_of_lifetime_end(manager: AgentManager, record: AgentRecord) -> None:
    now = utc_now()
    if record.expires_at is None or now >= record.expires_at:
        return
    if not manager.monitor.lifetime_warning_due(record.agent_id, record.expires_at, now):
        return
    remaining = (record.expires_at - now).total_seconds()
    logger.info(
        "agent %s will be stopped in %.0f s when its lifetime ends",
        record.agent_id,
        remaining,
        extra={logs.AGENT_ID: record.agent_id},
    )
    manager.audit.emit(
        "agent.lifetime_warning",
        outcome=Outcome.INFO,
        actor=ACTOR,
        agent_id=record.agent_id,
        reason_code="lifetime_ending",
        details={"expires_at": record.expires_at.isoformat(), "seconds_left": round(remaining, 1)},
    )
