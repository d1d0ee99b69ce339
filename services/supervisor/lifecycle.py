"""Agent lifecycle on one host: start, readiness, stop, lifetime and exit handling.

The supervisor is the only writer of an agent's record once it has accepted the start. Every
state change is written to Redis, published on `agents.v1.state.<agent>` and audited. A
start runs as a background task. A stop request during a start is honoured at the next step,
so a container is never created for an agent that was already stopped.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import httpx
from nats.aio.client import Client as NatsClient
from pydantic import TypeAdapter

from libs.common import bus, logs
from libs.common.audit import AuditPublisher
from libs.common.messages import (
    FINAL_STATES,
    AgentNetworkPolicy,
    AgentRecord,
    AgentState,
    AgentStateChanged,
    LogCounts,
    LogLine,
    LogStream,
    StartAgentRequest,
    StopReason,
    state_subject,
    utc_now,
)
from libs.common.messages import AuditOutcome as Outcome
from libs.common.sanitize import SecretRedactor, clean_line
from libs.common.store import AgentStore
from services.supervisor import metrics
from services.supervisor.agent_logs import AgentLogCollector
from services.supervisor.cache_manager import CacheManager
from services.supervisor.container_spec import AgentContainer, create_arguments
from services.supervisor.docker_adapter import DockerAdapter
from services.supervisor.errors import (
    AgentStartError,
    DockerUnavailable,
    FailureReason,
    ImageRejected,
)
from services.supervisor.firewall_gate import FirewallGate
from services.supervisor.images import ImageStore, SignatureCheck
from services.supervisor.monitor import ResourceMonitor
from services.supervisor.settings import SupervisorSettings
from services.supervisor.signatures import SignaturePolicy, VerificationMethod, Verified

logger = logging.getLogger(__name__)

ACTOR = "supervisor"
READY_PROBE_TIMEOUT = 1.0
_log_lines = TypeAdapter(list[LogLine])


class StopRequested(Exception):
    """Raised inside a start task when a stop request arrived for its agent."""


class AgentManager:
    """Start, watch and stop the agents of this host."""

    def __init__(
        self,
        settings: SupervisorSettings,
        *,
        docker: DockerAdapter,
        images: ImageStore,
        cache: CacheManager,
        store: AgentStore,
        audit: AuditPublisher,
        nats: NatsClient,
        firewall: FirewallGate,
        seccomp_profile: str,
        apparmor_profile: str | None = None,
        log_collector: AgentLogCollector,
        signature_policy: SignaturePolicy | None = None,
    ) -> None:
        self.settings = settings
        self.signature_policy = signature_policy
        self.docker = docker
        self.images = images
        self.cache = cache
        self.store = store
        self.audit = audit
        self.nats = nats
        self.firewall = firewall
        self.log_collector = log_collector
        self._seccomp_profile = seccomp_profile
        self._apparmor_profile = apparmor_profile
        self.monitor = ResourceMonitor(settings, mount_sources=docker.volume_sources)
        self._starts: dict[str, asyncio.Task[None]] = {}
        self._stop_requested: set[str] = set()
        self._start_slots = asyncio.Semaphore(settings.max_concurrent_starts)
        self._agent_locks: dict[str, asyncio.Lock] = {}
        # One client for every readiness probe: building one loads the CA bundle, which took
        # 19-34 ms per start on the benchmark machine (2 vCPU) although probes use plain HTTP.
        self._probe = httpx.AsyncClient(timeout=READY_PROBE_TIMEOUT, trust_env=False)

    async def close(self) -> None:
        """Stop following agent output and release the readiness-probe client."""
        await self.log_collector.close()
        await self._probe.aclose()

    @property
    def host_id(self) -> str:
        """This supervisor's host id."""
        return self.settings.host_id

    def starting(self, agent_id: str) -> bool:
        """Return whether a start task of `agent_id` is still running."""
        task = self._starts.get(agent_id)
        return task is not None and not task.done()

    async def save(self, record: AgentRecord) -> None:
        """Write `record` to Redis and announce the new state."""
        await self.store.put(record)
        message = AgentStateChanged(correlation_id=record.correlation_id, record=record)
        try:
            await self.nats.publish(state_subject(record.agent_id), bus.encode(message))
        except Exception as exc:  # the state is in Redis; a lost notice only delays pollers
            logger.warning("cannot publish state of %s: %s", record.agent_id, exc)
        if record.state in FINAL_STATES:
            # The agent no longer uses its image, which changes the in-use gauge.
            await self.cache.refresh_metrics()

    async def accept_start(self, request: StartAgentRequest) -> AgentRecord:
        """Take ownership of a requested agent and begin its start in the background.

        Raises AgentStartError when the agent is unknown, not in the requested state, or this
        host is full.
        """
        record = await self.store.get(request.agent_id)
        if record is None or record.state != AgentState.REQUESTED:
            state = None if record is None else record.state.value
            raise AgentStartError(
                FailureReason.INTERNAL_ERROR,
                f"agent {request.agent_id} is in state {state!r}, expected 'requested'",
            )
        active = len(await self.store.active_on_host(self.host_id))
        if active >= self.settings.max_agents:
            await self.fail(
                record,
                FailureReason.CAPACITY_EXHAUSTED,
                f"host {self.host_id} already runs {active} agents (--max-agents)",
            )
            return record
        try:
            tolerated = self.firewall.require_usable()
        except AgentStartError as exc:
            await self.fail(record, exc.reason, exc.message)
            return record
        if tolerated:
            logger.warning(
                "starting agent %s without a firewall (netguard runs with --disable-firewall)",
                record.agent_id,
                extra={logs.AGENT_ID: record.agent_id},
            )
            self.audit.emit(
                "agent.unprotected_start",
                outcome=Outcome.INFO,
                actor=ACTOR,
                agent_id=record.agent_id,
                reason_code="firewall_disabled",
            )
        record.host_id = self.host_id
        record.lifetime_seconds = min(record.lifetime_seconds, self.settings.max_container_lifetime)
        record.state = AgentState.PULLING
        await self.save(record)
        task = asyncio.create_task(self._start(record, request), name=f"start-{record.agent_id}")
        self._starts[record.agent_id] = task
        task.add_done_callback(lambda _: self._starts.pop(record.agent_id, None))
        return record

    async def _start(self, record: AgentRecord, request: StartAgentRequest) -> None:
        with logs.correlation_scope(record.correlation_id):
            async with self._start_slots:
                try:
                    async with self.cache.pinned(record.image_digest):
                        await self._run_start(record, request)
                except StopRequested:
                    await self.finish(record, StopReason.REQUESTED, exit_code=None)
                except ImageRejected as exc:
                    self._audit_image_rejected(record, exc)
                    await self.fail(record, exc.reason, exc.message)
                except AgentStartError as exc:
                    await self.fail(record, exc.reason, exc.message)
                except DockerUnavailable as exc:
                    await self.fail(record, FailureReason.INTERNAL_ERROR, str(exc))
                except Exception as exc:
                    logger.exception("start of %s failed unexpectedly", record.agent_id)
                    await self.fail(record, FailureReason.INTERNAL_ERROR, f"{exc!r}")
                finally:
                    self._stop_requested.discard(record.agent_id)

    async def _run_start(self, record: AgentRecord, request: StartAgentRequest) -> None:
        known = await self.store.image_id_for(record.image_digest)
        check = SignatureCheck(
            policy=self.signature_policy,
            required=self.settings.require_signed_images,
            signature=request.image_signature,
            bundle=request.image_bundle,
        )
        resolved = await asyncio.to_thread(
            self.images.resolve,
            record.image_url,
            record.image_digest,
            known_image_id=known,
            signatures=check,
        )
        await self.store.remember_image_id(record.image_digest, resolved.image_id)
        await self.cache.record_use(resolved)
        record.image_id = resolved.image_id
        record.image_signer = describe_signer(resolved.signer)
        if resolved.signer is None:
            logger.warning(
                "agent %s runs image %s unsigned (--require-signed-images is off)",
                record.agent_id,
                record.image_digest,
                extra={logs.AGENT_ID: record.agent_id, logs.IMAGE_DIGEST: record.image_digest},
            )
            self.audit.emit(
                "image.unsigned",
                outcome=Outcome.INFO,
                actor=ACTOR,
                agent_id=record.agent_id,
                reason_code="signature_not_required",
                details={"image_digest": record.image_digest},
            )
        self.audit.emit(
            "image.verified",
            outcome=Outcome.SUCCESS,
            actor=ACTOR,
            agent_id=record.agent_id,
            details={
                "image_digest": record.image_digest,
                "image_id": resolved.image_id,
                "downloaded": resolved.downloaded,
                "loaded": resolved.loaded,
                "signer": record.image_signer,
            },
        )
        self._check_stop(record)

        record.state = AgentState.STARTING
        await self.save(record)
        agent = AgentContainer(
            agent_id=record.agent_id,
            host_id=self.host_id,
            image_id=resolved.image_id,
            image_digest=record.image_digest,
            env=dict(request.env),
        )
        arguments = create_arguments(
            agent,
            settings=self.settings,
            seccomp_profile=self._seccomp_profile,
            apparmor_profile=self._apparmor_profile,
        )
        record.container_id = await asyncio.to_thread(self.docker.create_and_start, arguments)
        await self.log_collector.follow(record.agent_id, record.container_id)
        record.host_address, record.host_port = await asyncio.to_thread(
            self.docker.published_port, record.container_id
        )
        record.sandbox_address = await asyncio.to_thread(
            self.docker.sandbox_address, record.container_id, self.settings.sandbox_network
        )
        await self.firewall.register(
            AgentNetworkPolicy(
                agent_id=record.agent_id,
                address=record.sandbox_address,
                allowed_domains=record.allowed_domains,
            ),
            add=True,
            correlation_id=record.correlation_id,
        )
        record.started_at = utc_now()
        record.expires_at = record.started_at + timedelta(seconds=record.lifetime_seconds)
        await self.save(record)
        for event in ("agent.created", "agent.started"):
            self.audit.emit(
                event,
                outcome=Outcome.SUCCESS,
                actor=ACTOR,
                agent_id=record.agent_id,
                details={"container_id": record.container_id, "image_id": record.image_id},
            )

        await self._wait_ready(record)
        record.state = AgentState.READY
        record.ready_at = utc_now()
        await self.save(record)
        self.audit.emit(
            "agent.ready",
            outcome=Outcome.SUCCESS,
            actor=ACTOR,
            agent_id=record.agent_id,
            details={"host_port": record.host_port, "expires_at": record.expires_at.isoformat()},
        )
        logger.info(
            "agent %s ready on %s:%s",
            record.agent_id,
            record.host_address,
            record.host_port,
            extra={logs.AGENT_ID: record.agent_id, logs.CONTAINER_ID: record.container_id},
        )

    async def _wait_ready(self, record: AgentRecord) -> None:
        assert record.container_id is not None
        url = f"http://{record.host_address}:{record.host_port}/"
        deadline = asyncio.get_running_loop().time() + self.settings.agent_start_timeout
        delay = 0.02
        while True:
            self._check_stop(record)
            status = await asyncio.to_thread(self.docker.status, record.container_id)
            if status is None or not status.running:
                code = None if status is None else status.exit_code
                raise AgentStartError(
                    FailureReason.EXITED_BEFORE_READY,
                    f"container exited with code {code} before answering HTTP on port 80",
                )
            try:
                await self._probe.get(url)
                return
            except httpx.HTTPError:
                pass  # not listening yet; any HTTP response at all counts as ready
            if asyncio.get_running_loop().time() >= deadline:
                raise AgentStartError(
                    FailureReason.READY_TIMEOUT,
                    f"agent did not answer HTTP on port 80 within "
                    f"{self.settings.agent_start_timeout:g} s (--agent-start-timeout)",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _check_stop(self, record: AgentRecord) -> None:
        if record.agent_id in self._stop_requested:
            raise StopRequested(record.agent_id)

    async def stop(self, agent_id: str, *, wait: float = 10.0) -> AgentRecord | None:
        """Stop an agent on request and return its record, or None when it is unknown.

        A start in progress is asked to stop and given `wait` seconds to do so. If it is still
        busy (a long download, say), the record is returned in state 'stopping' and the start
        task finishes the stop itself.
        """
        task = self._starts.get(agent_id)
        if task is not None and not task.done():
            self._stop_requested.add(agent_id)
            await asyncio.wait([task], timeout=wait)
        async with self._lock(agent_id):
            record = await self.store.get(agent_id)
            if record is None or record.state in FINAL_STATES:
                return record
            if self.starting(agent_id):
                record.state = AgentState.STOPPING
                await self.save(record)
                return record
            return await self.terminate(record, StopReason.REQUESTED)

    async def expire_or_collect(
        self,
        record: AgentRecord,
        *,
        running: bool,
        oom_killed: bool = False,
        limit: StopReason | None = None,
    ) -> None:
        """Stop a ready agent whose lifetime ended or that hit `limit`, or record its exit.

        `oom_killed` is Docker's State.OOMKilled of an exited container, which turns the exit
        into `out_of_memory`.
        """
        async with self._lock(record.agent_id):
            current = await self.store.get(record.agent_id)
            if current is None or current.state != AgentState.READY:
                return
            if not running:
                if oom_killed:
                    # The OOM killer ended the container's main process, as under gVisor, where
                    # it picks the sandbox: the limit was reached even though no sample saw it.
                    self.audit.emit(
                        "agent.limit_reached",
                        outcome=Outcome.INFO,
                        actor=ACTOR,
                        agent_id=current.agent_id,
                        reason_code=StopReason.OUT_OF_MEMORY.value,
                        details={
                            "message": "Docker reports the container killed by the OOM killer "
                            f"at the memory limit of {int(self.settings.container_memory_limit)} "
                            "bytes"
                        },
                    )
                exited = StopReason.OUT_OF_MEMORY if oom_killed else StopReason.EXITED
                await self.terminate(current, exited)
            elif limit is not None:
                await self.terminate(current, limit)
            elif current.expires_at is not None and utc_now() >= current.expires_at:
                await self.terminate(current, StopReason.LIFETIME_EXCEEDED)

    async def terminate(self, record: AgentRecord, reason: StopReason) -> AgentRecord:
        record.state = AgentState.STOPPING
        await self.save(record)
        exit_code = None
        if record.container_id:
            # The cgroup disappears with the container, so the final usage is read first.
            await asyncio.to_thread(self.monitor.sample_one, record.agent_id, record.container_id)
            status = await asyncio.to_thread(
                self.docker.stop, record.container_id, grace=self.settings.agent_stop_grace
            )
            exit_code = None if status is None else status.exit_code
        return await self.finish(record, reason, exit_code=exit_code)

    async def finish(
        self, record: AgentRecord, reason: StopReason, *, exit_code: int | None
    ) -> AgentRecord:
        await self._keep_logs_and_remove(record)
        record.state = AgentState.STOPPED
        record.stop_reason = reason
        record.exit_code = exit_code
        record.killed_for_time = reason == StopReason.LIFETIME_EXCEEDED
        record.resource_usage = self.monitor.usage(record.agent_id)
        record.stopped_at = utc_now()
        await self.save(record)
        self.monitor.forget(record.agent_id)
        metrics.AGENT_STOPS.labels(reason=reason.value).inc()
        event = "agent.killed" if record.killed_for_time else "agent.stopped"
        usage = record.resource_usage
        self.audit.emit(
            event,
            outcome=Outcome.SUCCESS,
            actor=ACTOR,
            agent_id=record.agent_id,
            reason_code=reason.value,
            details={
                "exit_code": exit_code,
                "container_id": record.container_id,
                "resource_usage": None if usage is None else usage.model_dump(),
            },
        )
        logger.info(
            "agent %s stopped (%s, exit code %s)",
            record.agent_id,
            reason.value,
            exit_code,
            extra={logs.AGENT_ID: record.agent_id, logs.REASON: reason.value},
        )
        return record

    async def fail(self, record: AgentRecord, reason: FailureReason, message: str) -> None:
        await self._keep_logs_and_remove(record)
        record.state = AgentState.FAILED
        record.failure_reason = reason.value
        record.failure_message = message
        record.stop_reason = StopReason.FAILED
        record.stopped_at = utc_now()
        await self.save(record)
        self.monitor.forget(record.agent_id)
        self.audit.emit(
            "agent.failed",
            outcome=Outcome.FAILURE,
            actor=ACTOR,
            agent_id=record.agent_id,
            reason_code=reason.value,
            details={"message": message, "container_id": record.container_id},
        )
        logger.warning(
            "agent %s failed: %s: %s",
            record.agent_id,
            reason.value,
            message,
            extra={logs.AGENT_ID: record.agent_id, logs.REASON: reason.value},
        )

    async def _keep_logs_and_remove(self, record: AgentRecord) -> None:
        if not record.container_id:
            return
        await self.log_collector.finish(record.agent_id)
        await asyncio.to_thread(self.docker.remove, record.container_id)
        if self.settings.runtime == "runsc":
            # A container removed by someone else without -v leaves the agent's volumes.
            await asyncio.to_thread(
                self.docker.remove_dangling_volumes, self.host_id, record.agent_id
            )
        if record.sandbox_address:
            try:
                await self.firewall.register(
                    AgentNetworkPolicy(
                        agent_id=record.agent_id,
                        address=record.sandbox_address,
                        allowed_domains=record.allowed_domains,
                    ),
                    add=False,
                    correlation_id=record.correlation_id,
                )
            except AgentStartError as exc:
                # Docker may hand the address to the next agent, which registers it anew.
                logger.warning(
                    "cannot unregister %s: %s",
                    record.agent_id,
                    exc.message,
                    extra={logs.AGENT_ID: record.agent_id},
                )

    async def read_container_logs(self, container_id: str, *, tail: int) -> list[LogLine]:
        """Return the last `tail` lines of a container's output, read from Docker and cleaned.

        It serves agents whose output the collector never stored, such as agents started by a
        supervisor without one. Secrets are redacted, but the rate limit does not apply.
        """
        raw_lines = await asyncio.to_thread(self.docker.logs, container_id, tail=tail)
        redactors = {stream: SecretRedactor() for stream in LogStream}
        lines = []
        for raw in raw_lines:
            stream = LogStream(raw.stream)
            cleaned = clean_line(
                raw.data,
                max_length=self.settings.log_max_line_length,
                redactor=redactors[stream],
            )
            lines.append(
                LogLine(
                    stream=stream,
                    time=raw.time,
                    text=cleaned.text,
                    truncated=cleaned.truncated,
                    container_id=container_id,
                    redactions=cleaned.redactions,
                )
            )
        return lines

    async def logs(self, record: AgentRecord, *, tail: int) -> list[LogLine]:
        """Return an agent's last `tail` lines as the log collector stored them.

        Agents without a collected log are served from Docker while they run, and from the
        lines that earlier supervisor versions kept at stop after that.
        """
        collected = await self.log_collector.lines(record.agent_id, tail=tail)
        if collected is not None:
            return collected
        if record.container_id and record.state not in FINAL_STATES:
            return await self.read_container_logs(record.container_id, tail=tail)
        kept = await self.store.final_logs(record.agent_id)
        return [] if kept is None else _log_lines.validate_json(kept)[-tail:]

    async def log_counts(self, agent_id: str) -> LogCounts | None:
        """Return the totals of an agent's collected output, or None when it was not collected."""
        return await self.log_collector.counts(agent_id)

    async def resume_log_collection(self) -> None:
        """Follow the output of this host's ready agents again, after a supervisor restart."""
        for agent_id in await self.store.active_on_host(self.host_id):
            record = await self.store.get(agent_id)
            if record is None or record.state != AgentState.READY or not record.container_id:
                continue
            await self.log_collector.follow(agent_id, record.container_id)
            logger.info(
                "resumed log collection of agent %s",
                agent_id,
                extra={logs.AGENT_ID: agent_id, logs.CONTAINER_ID: record.container_id},
            )

    def _audit_image_rejected(self, record: AgentRecord, exc: ImageRejected) -> None:
        logger.warning(
            "image %s of agent %s failed verification: %s: %s",
            record.image_digest,
            record.agent_id,
            exc.reason.value,
            exc.message,
            extra={
                logs.AGENT_ID: record.agent_id,
                logs.IMAGE_DIGEST: record.image_digest,
                logs.REASON: exc.reason.value,
            },
        )
        metrics.VERIFICATION_FAILURES.labels(reason=exc.reason.value).inc()
        self.audit.emit(
            "image.verification_failed",
            outcome=Outcome.DENIED,
            actor=ACTOR,
            agent_id=record.agent_id,
            reason_code=exc.reason.value,
            details={"image_digest": record.image_digest, "message": exc.message},
        )

    def _lock(self, agent_id: str) -> asyncio.Lock:
        return self._agent_locks.setdefault(agent_id, asyncio.Lock())


def describe_signer(signer: Verified | None) -> str:
    """Return the signer as the agent record shows it."""
    if signer is None:
        return "unsigned"
    if signer.method is VerificationMethod.SIGSTORE:
        return f"sigstore {signer.identity} ({signer.issuer})"
    return f"key {signer.key_fingerprint}"
