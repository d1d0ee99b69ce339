"""Supervisor entry point: checks, reconciliation, then the NATS request handlers.

Pipeline at startup: settings, logging, seccomp profile, AppArmor, Docker and the sandbox network,
NATS and the audit stream, the probe of the agents' runtime (gVisor), Redis and the metrics
endpoint, reconciliation of this host's
containers, resumed log collection of the agents it adopted, reconciliation of the image
cache, then the start handler (queue group, so any of several supervisors may take a
start), this host's stop, logs, cache-purge and runtime-status handlers, and
the loops that watch agents and evict cached images. On SIGTERM it stops taking requests
and leaves running agents alone; the next start adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from pydantic import BaseModel

from libs.common import bus, logs
from libs.common.audit import AuditPublisher
from libs.common.errors import BusError, CommonError, ConfigurationError, StoreError
from libs.common.messages import (
    START_QUEUE_GROUP,
    SUBJECT_START,
    AgentRecordReply,
    AuditOutcome,
    CachePurgeReply,
    CachePurgeRequest,
    ErrorReply,
    LogsReply,
    LogsRequest,
    RuntimeStatusReply,
    RuntimeStatusRequest,
    StartAgentReply,
    StartAgentRequest,
    StopAgentRequest,
    host_subject,
)
from libs.common.settings import Profile, load_settings
from libs.common.store import AgentStore, connect_redis
from services.supervisor import metrics
from services.supervisor.agent_logs import AgentLogCollector
from services.supervisor.apparmor import AppArmorState, AppArmorStatus, check_apparmor
from services.supervisor.cache import CacheState
from services.supervisor.cache_manager import CacheManager
from services.supervisor.docker_adapter import DockerAdapter
from services.supervisor.download import DownloadLimits
from services.supervisor.errors import AgentStartError, SupervisorError
from services.supervisor.firewall_gate import FirewallGate
from services.supervisor.image_sources import parse_trusted_sources
from services.supervisor.images import ImageStore
from services.supervisor.lifecycle import AgentManager
from services.supervisor.runtime_probe import RuntimeProbeResult, check_runtime
from services.supervisor.seccomp import load_seccomp_profile
from services.supervisor.settings import SupervisorSettings
from services.supervisor.signatures import SignaturePolicy
from services.supervisor.tarball import TarballLimits
from services.supervisor.watch import reconcile, watch_agents

logger = logging.getLogger(__name__)

SERVICE = "supervisor"
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def load_confinement(settings: SupervisorSettings) -> tuple[str, AppArmorStatus]:
    """Load the agents' seccomp profile and check AppArmor; raise ConfigurationError if unfit."""
    seccomp_profile = load_seccomp_profile(
        settings.seccomp_profile, allow_unsafe=settings.unsafe_allow_seccomp_families
    )
    apparmor = check_apparmor(settings.apparmor_profile)
    metrics.APPARMOR_ENFORCED.set(1 if apparmor.state == AppArmorState.ENFORCED else 0)
    return seccomp_profile, apparmor


Handler = Callable[[Msg], Awaitable[BaseModel]]


_running: set[asyncio.Task[None]] = set()


def _serve(handler: Handler) -> Callable[[Msg], Awaitable[None]]:
    """Wrap a request handler: correlation id in logs, and an ErrorReply for every failure.

    nats-py runs one subscription's callbacks one after another, so each request gets its own
    task; otherwise a slow stop would hold up every other stop.
    """

    async def callback(msg: Msg) -> None:
        task = asyncio.create_task(handle(msg))
        _running.add(task)
        task.add_done_callback(_running.discard)

    async def handle(msg: Msg) -> None:
        correlation_id = "unknown"
        with contextlib.suppress(ValueError, AttributeError):
            candidate = str(json.loads(msg.data).get("correlation_id"))
            if _CORRELATION_ID.fullmatch(candidate):
                correlation_id = candidate
        with logs.correlation_scope(correlation_id):
            try:
                reply = await handler(msg)
            except BusError as exc:
                reply = _error(correlation_id, "invalid_request", str(exc))
            except AgentStartError as exc:
                reply = _error(correlation_id, exc.reason.value, exc.message)
            except (SupervisorError, StoreError) as exc:
                logger.error("request on %s failed: %s", msg.subject, exc)
                reply = _error(correlation_id, "unavailable", str(exc))
            except Exception:
                logger.exception("request on %s failed unexpectedly", msg.subject)
                reply = _error(correlation_id, "internal_error", "unexpected supervisor error")
            await bus.respond(msg, reply)

    return callback


def load_signature_policy(settings: SupervisorSettings) -> SignaturePolicy | None:
    """Return the configured signers, or None when none is configured (development only).

    Raises ConfigurationError naming the key file or option at fault, and when signatures
    are required but no signer is configured.
    """
    if not settings.image_signing_key and settings.image_signing_trusted_root is None:
        if settings.require_signed_images:
            raise ConfigurationError(
                "--require-signed-images is on but no signer is configured; set "
                "--image-signing-key or --image-signing-trusted-root (with "
                "--image-signing-identity and --image-signing-issuer), or use --profile "
                "development to run unsigned images"
            )
        logger.warning(
            "no image signer is configured (--image-signing-key, --image-signing-trusted-root); "
            "images run unsigned, which only the development profile allows"
        )
        return None
    try:
        policy = SignaturePolicy.from_files(
            key_files=settings.image_signing_key,
            trusted_root=settings.image_signing_trusted_root,
            identity=settings.image_signing_identity,
            issuer=settings.image_signing_issuer,
        )
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc
    if not settings.require_signed_images:
        logger.warning(
            "--require-signed-images is off: images without a signature run, and only "
            "signatures that are given are checked"
        )
    return policy


def download_limits(settings: SupervisorSettings) -> DownloadLimits:
    """Return the download bounds and image source policy; warn when no source is set."""
    if not settings.trusted_image_sources:
        logger.warning(
            "no --trusted-image-sources: images may come from any host whose addresses are "
            "public; set the URL prefixes of your image servers"
        )
    return DownloadLimits(
        max_size=int(settings.image_max_size),
        connect_timeout=settings.download_connect_timeout,
        read_timeout=settings.download_read_timeout,
        total_timeout=settings.download_total_timeout,
        allow_http=settings.allow_http_image_urls,
        trusted_sources=tuple(
            parse_trusted_sources(
                settings.trusted_image_sources, allow_http=settings.allow_http_image_urls
            )
        ),
        max_redirects=settings.image_max_redirects,
    )


def _error(correlation_id: str, code: str, message: str) -> ErrorReply:
    return ErrorReply(correlation_id=correlation_id, code=code, message=message)


class Handlers:
    """NATS request handlers of one supervisor."""

    def __init__(self, manager: AgentManager, *, runtime: RuntimeProbeResult) -> None:
        self.manager = manager
        self.cache = manager.cache
        self.runtime = runtime

    async def start(self, msg: Msg) -> BaseModel:
        request = bus.decode(msg.data, StartAgentRequest, subject=msg.subject)
        record = await self.manager.accept_start(request)
        return StartAgentReply(
            correlation_id=request.correlation_id,
            agent_id=record.agent_id,
            host_id=self.manager.host_id,
        )

    async def stop(self, msg: Msg) -> BaseModel:
        request = bus.decode(msg.data, StopAgentRequest, subject=msg.subject)
        record = await self.manager.stop(request.agent_id)
        if record is None:
            return _error(request.correlation_id, "agent_not_found", request.agent_id)
        return AgentRecordReply(correlation_id=request.correlation_id, record=record)

    async def logs(self, msg: Msg) -> BaseModel:
        request = bus.decode(msg.data, LogsRequest, subject=msg.subject)
        record = await self.manager.store.get(request.agent_id)
        if record is None:
            return _error(request.correlation_id, "agent_not_found", request.agent_id)
        lines = await self.manager.logs(record, tail=request.tail)
        return LogsReply(
            correlation_id=request.correlation_id,
            agent_id=record.agent_id,
            container_id=record.container_id or "",
            lines=lines,
            counts=await self.manager.log_counts(record.agent_id),
        )

    async def purge_cache(self, msg: Msg) -> BaseModel:
        request = bus.decode(msg.data, CachePurgeRequest, subject=msg.subject)
        result = await self.cache.purge(request.digest)
        return CachePurgeReply(
            correlation_id=request.correlation_id,
            host_id=self.manager.host_id,
            purged=result.purged,
            skipped=result.skipped,
        )

    async def runtime_status(self, msg: Msg) -> BaseModel:
        request = bus.decode(msg.data, RuntimeStatusRequest, subject=msg.subject)
        return RuntimeStatusReply(
            correlation_id=request.correlation_id,
            host_id=self.manager.host_id,
            runtime="runsc" if self.runtime.runtime == "runsc" else "runc",
            docker_runtime=self.runtime.docker_runtime,
            gvisor_status=self.runtime.status.value,
        )


async def run(settings: SupervisorSettings) -> None:  # noqa: PLR0915 - the startup pipeline
    """Run the supervisor until SIGTERM or SIGINT."""
    settings.warn_if_relaxed()
    if not settings.bind_address.is_loopback:
        logger.warning(
            "agent ports are published on %s, not loopback; every host on that network can "
            "reach the agents",
            settings.bind_address,
        )
    seccomp_profile, apparmor = load_confinement(settings)
    signature_policy = load_signature_policy(settings)
    docker = DockerAdapter.from_environment()
    docker.ensure_sandbox_network(settings)

    nats = await bus.connect(settings, name=f"{SERVICE}@{settings.host_id}")
    audit = AuditPublisher(
        await bus.ensure_audit_stream(nats), service=SERVICE, host=settings.host_id
    )
    audit.start()
    runtime = await check_runtime(docker, settings, seccomp_profile=seccomp_profile, audit=audit)
    redis_client = connect_redis(settings)
    store = AgentStore(redis_client, final_record_ttl=settings.final_record_ttl)
    await store.ping()
    if settings.metrics_port:
        try:
            metrics.serve(str(settings.metrics_address), settings.metrics_port)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {settings.metrics_address}:{settings.metrics_port}: "
                f"{exc.strerror}; choose another --metrics-port, or 0 to turn metrics off"
            ) from exc
        logger.info(
            "metrics on http://%s:%d/metrics", settings.metrics_address, settings.metrics_port
        )
    images = ImageStore(
        docker,
        cache_dir=settings.cache_dir,
        download_limits=download_limits(settings),
        tarball_limits=TarballLimits(
            max_members=settings.image_max_members,
            max_total_size=int(settings.image_max_size),
        ),
    )
    removed = images.remove_partial_downloads()
    if removed:
        logger.warning("removed %d partial downloads left by an earlier run", removed)
    firewall = FirewallGate(
        nats,
        host_id=settings.host_id,
        allow_disabled=settings.profile == Profile.DEVELOPMENT,
        timeout=settings.firewall_registration_timeout,
    )
    await firewall.start()
    cache = CacheManager(
        settings,
        state=CacheState(redis_client, host_id=settings.host_id),
        images=images,
        docker=docker,
        store=store,
        audit=audit,
    )
    manager = AgentManager(
        settings,
        docker=docker,
        images=images,
        cache=cache,
        store=store,
        audit=audit,
        nats=nats,
        firewall=firewall,
        seccomp_profile=seccomp_profile,
        apparmor_profile=apparmor.profile,
        signature_policy=signature_policy,
        log_collector=AgentLogCollector(
            settings,
            # Two followed streams per agent, each holding a connection while it runs.
            docker=DockerAdapter.from_environment(max_pool_size=2 * settings.max_agents + 4),
            redis_client=redis_client,
            audit=audit,
        ),
    )
    audit.emit(
        "service.started",
        outcome=AuditOutcome.INFO,
        actor=SERVICE,
        details={
            "settings": settings.redacted(),
            "relaxed": list(settings.relaxed_settings()),
            "apparmor": apparmor.as_details(),
            "runtime": runtime.as_details(),
        },
    )
    await reconcile(manager)
    await manager.resume_log_collection()
    await cache.reconcile()

    handlers = Handlers(manager, runtime=runtime)
    subscriptions = [
        await nats.subscribe(SUBJECT_START, queue=START_QUEUE_GROUP, cb=_serve(handlers.start)),
        await nats.subscribe(host_subject(settings.host_id, "stop"), cb=_serve(handlers.stop)),
        await nats.subscribe(host_subject(settings.host_id, "logs"), cb=_serve(handlers.logs)),
        await nats.subscribe(
            host_subject(settings.host_id, "cache"), cb=_serve(handlers.purge_cache)
        ),
        await nats.subscribe(
            host_subject(settings.host_id, "runtime"), cb=_serve(handlers.runtime_status)
        ),
    ]
    watcher = asyncio.create_task(watch_agents(manager), name="watch-agents")
    evictions = asyncio.create_task(cache.run(), name="image-cache-evictions")
    logger.info("supervisor %s started", settings.host_id)

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()

    logger.info(
        "supervisor %s stopping; running agents are left for the next start", settings.host_id
    )
    for subscription in subscriptions:
        await subscription.unsubscribe()
    watcher.cancel()
    evictions.cancel()
    await manager.close()
    await firewall.close()
    audit.emit("service.stopped", outcome=AuditOutcome.INFO, actor=SERVICE)
    await audit.close()
    await nats.drain()
    logger.info("supervisor %s stopped", settings.host_id)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `agent-runner-supervisor`."""
    try:
        settings = load_settings(SupervisorSettings, sys.argv[1:] if argv is None else argv)
    except ConfigurationError as exc:
        print(f"agent-runner-supervisor: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure_logging(service=SERVICE, host=settings.host_id, level=settings.log_level)
    try:
        asyncio.run(run(settings))
    except (CommonError, SupervisorError) as exc:
        logger.critical("supervisor cannot run: %s", exc)
        sys.exit(1)
