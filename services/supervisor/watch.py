"""Reconciliation after a restart, and the loop that enforces lifetimes and notices exits.

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
import logging

from libs.common import logs
from libs.common.errors import StoreError
from libs.common.messages import FINAL_STATES, AgentState, StopReason, utc_now
from services.supervisor.docker_adapter import ContainerStatus
from services.supervisor.errors import DockerUnavailable, FailureReason
from services.supervisor.lifecycle import AgentManager

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
        return
    if record.state in FINAL_STATES:
        logger.warning(
            "removing container %s of finished agent", container.container_id[:12], extra=extra
        )
        await asyncio.to_thread(manager.docker.remove, container.container_id)
        return
    if record.state == AgentState.READY:
        expired = record.expires_at is not None and utc_now() >= record.expires_at
        if container.running and not expired:
            logger.info("adopted running agent %s", record.agent_id, extra=extra)
            return
        await manager.expire_or_collect(record, running=container.running)
        return
    if record.state == AgentState.STOPPING:
        await manager.terminate(record, StopReason.REQUESTED)
        return
    await manager.fail(
        record,
        FailureReason.SUPERVISOR_RESTARTED,
        f"supervisor restarted while the agent was {record.state.value}",
    )


async def watch_agents(manager: AgentManager) -> None:
    """Check lifetimes and exits of ready agents every `--monitor-interval` seconds."""
    while True:
        try:
            await _check_once(manager)
        except (DockerUnavailable, StoreError) as exc:
            logger.error("agent check failed: %s; retrying", exc)
        except Exception:
            logger.exception("agent check failed unexpectedly; retrying")
        await asyncio.sleep(manager.settings.monitor_interval)


async def _check_once(manager: AgentManager) -> None:
    statuses = {
        status.agent_id: status
        for status in await asyncio.to_thread(manager.docker.list_managed, manager.host_id)
        if status.agent_id
    }
    for agent_id in await manager.store.active_on_host(manager.host_id):
        if manager.starting(agent_id):
            continue
        record = await manager.store.get(agent_id)
        if record is None or record.state != AgentState.READY:
            continue
        status = statuses.get(agent_id)
        running = status is not None and status.running
        await manager.expire_or_collect(record, running=running)
