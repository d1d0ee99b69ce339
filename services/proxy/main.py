"""Entry point of agent-runner-proxy: an embedded mitmproxy with the egress filter loaded.

Pipeline: settings and logging, the request-head limit, NATS and the audit stream, Redis (the
agents' policies and the rate counters), the resolver, then one mitmproxy master with three
modes on the sandbox gateway address: transparent (netguard redirects agents' TCP 80 and 443
there), regular (the explicit proxy) and DNS. Only the addons the filter needs are loaded; in
particular mitmproxy's own DNS resolver is not, so an unanswered query gets SERVFAIL and
nothing is forwarded. While the master runs, the proxy publishes a ProxyState on
`proxy.v1.host.<host>.state` every few seconds, which the gateway's /readyz reports. SIGTERM
and SIGINT stop the master and flush the audit queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import socket
import sys
import time
from ipaddress import IPv4Address

from mitmproxy import connection, options
from mitmproxy.addons import core, disable_h2c, errorcheck, proxyserver, tlsconfig
from mitmproxy.master import Master
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

from libs.common import bus, logs
from libs.common.audit import AuditPublisher
from libs.common.decisions import Decision, Reason
from libs.common.errors import CommonError, ConfigurationError
from libs.common.messages import AuditOutcome, ProxyState, proxy_state_subject, utc_now
from libs.common.registry import AgentRegistry
from libs.common.settings import load_settings
from libs.common.store import connect_redis
from services.proxy import dns_guard, header_limit
from services.proxy.egress import EgressFilter
from services.proxy.limits import Limiter, RateLimits
from services.proxy.records import DecisionRecord
from services.proxy.resolver import Resolver, system_nameservers
from services.proxy.settings import ProxySettings

logger = logging.getLogger(__name__)

SERVICE = "proxy"


FREEZE_AFTER_SECONDS = 3.0
# How often the proxy publishes that it runs; the gateway's /readyz calls a proxy stale after
# three intervals without a message.
STATE_INTERVAL_SECONDS = 5.0


def _freeze_startup_objects() -> None:
    gc.collect()
    gc.freeze()
    logger.info("moved %d start-up objects out of garbage collection", gc.get_freeze_count())


async def publish_state(nats: NatsClient, host_id: str, *, running: bool) -> None:
    """Publish the proxy's state once; a failure is logged, and the next interval retries."""
    state = ProxyState(
        correlation_id=f"proxy-{host_id}",
        host_id=host_id,
        running=running,
        published_at=utc_now(),
        publish_interval=STATE_INTERVAL_SECONDS,
    )
    try:
        await nats.publish(proxy_state_subject(host_id), bus.encode(state))
    except (NatsError, OSError) as exc:
        logger.warning("cannot publish the proxy state: %s", exc)


async def _publish_state_periodically(nats: NatsClient, host_id: str) -> None:
    while True:
        await publish_state(nats, host_id, running=True)
        await asyncio.sleep(STATE_INTERVAL_SECONDS)


class ProxyStartError(CommonError):
    """The proxy cannot listen or cannot reach what it needs."""


def _wait_for_address(address: IPv4Address, timeout: float) -> None:
    """Wait until `address` is assigned to an interface of this host."""
    deadline = time.monotonic() + timeout
    logged = False
    while True:
        with socket.socket() as probe:
            try:
                probe.bind((str(address), 0))
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
            else:
                return
        if time.monotonic() >= deadline:
            raise ProxyStartError(
                f"sandbox gateway {address} is not assigned to any interface after "
                f"{timeout:g} s; start the supervisor (it creates the sandbox network) or set "
                "--sandbox-gateway and --sandbox-subnet to match it"
            )
        if not logged:
            logger.warning("waiting for the sandbox gateway address %s to appear", address)
            logged = True
        time.sleep(0.5)


def build_options(settings: ProxySettings) -> options.Options:
    """Return mitmproxy options for the three modes on the sandbox gateway."""
    listen = str(settings.gateway_address)
    opts = options.Options()
    # Addons add their options when they load; these are set after that, in run().
    opts.update(
        mode=[
            f"transparent@{listen}:{settings.proxy_transparent_port}",
            f"regular@{listen}:{settings.proxy_explicit_port}",
            f"dns@{listen}:{settings.proxy_dns_port}",
        ],
    )
    return opts


def _configure_master(master: Master, settings: ProxySettings) -> None:
    settings.confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    updates: dict[str, object] = {
        # Lazy: no upstream connection before the filter has seen the ClientHello or request.
        "connection_strategy": "lazy",
        # Anything that is neither TLS nor HTTP fails to parse and is closed.
        "rawtcp": False,
        "body_size_limit": str(settings.max_request_body_bytes),
        "confdir": str(settings.confdir),
        "ssl_insecure": False,
        "server_replay_reuse": False,
    }
    if settings.upstream_ca_file is not None:
        updates["ssl_verify_upstream_trusted_ca"] = str(settings.upstream_ca_file)
    master.options.update(**{k: v for k, v in updates.items() if k in master.options})


async def run(settings: ProxySettings) -> None:
    """Run the proxy until SIGTERM or SIGINT."""
    settings.warn_if_relaxed()
    nats = await bus.connect(settings, name=f"{SERVICE}@{settings.host_id}")
    audit = AuditPublisher(
        await bus.ensure_audit_stream(nats), service=SERVICE, host=settings.host_id
    )
    audit.start()
    redis_client = connect_redis(settings, retries=1)
    try:
        nameservers = [str(server) for server in settings.upstream_dns] or system_nameservers()
        resolver = Resolver(
            nameservers,
            port=settings.upstream_dns_port,
            timeout=settings.dns_timeout,
            cache_seconds=settings.dns_cache_seconds,
        )
        limiter = Limiter(
            redis_client,
            host_id=settings.host_id,
            limits=RateLimits(
                requests_per_window=settings.max_requests_per_window,
                bytes_per_window=settings.max_bytes_per_window,
                window_seconds=settings.rate_window_seconds,
            ),
        )
        dns_limiter = Limiter(
            redis_client,
            host_id=settings.host_id,
            limits=RateLimits(
                requests_per_window=settings.max_dns_queries_per_window,
                bytes_per_window=settings.max_bytes_per_window,
                window_seconds=settings.rate_window_seconds,
            ),
            requests_counter="dns",
        )
        egress = EgressFilter(
            settings,
            audit=audit,
            registry=AgentRegistry(redis_client, host_id=settings.host_id),
            resolver=resolver,
            limiter=limiter,
            dns_limiter=dns_limiter,
        )

        def head_too_large(client: connection.Connection, size: int) -> None:
            state = egress.states.get(client.id)
            DecisionRecord(
                audit=audit,
                event_type="proxy.request",
                agent_id=state.agent.agent_id if state else None,
                mode=state.mode if state else "unknown",
                protocol="http",
                client=state.client if state else "unknown",
                decision=Decision.deny(
                    Reason.HEADERS_TOO_LARGE,
                    f"{size} bytes of request head without its end, over "
                    f"--max-request-header-bytes {settings.max_request_header_bytes}",
                ),
                status=431,
            ).finish()

        def dns_malformed(client: connection.Client, size: int) -> None:
            state = egress.states.get(client.id)
            DecisionRecord(
                audit=audit,
                event_type="proxy.dns_query",
                agent_id=state.agent.agent_id if state else None,
                mode="dns",
                protocol="dns",
                client=state.client if state else "unknown",
                decision=Decision.deny(
                    Reason.DNS_MALFORMED, f"a {size}-byte DNS message that does not parse"
                ),
            ).finish()

        header_limit.install(settings.max_request_header_bytes, head_too_large)
        dns_guard.install(dns_malformed)
        await asyncio.to_thread(_wait_for_address, settings.gateway_address, settings.listen_wait)

        master = Master(build_options(settings))
        master.addons.add(
            core.Core(),
            proxyserver.Proxyserver(),
            tlsconfig.TlsConfig(),
            disable_h2c.DisableH2C(),
            egress,
            errorcheck.ErrorCheck(),
        )
        _configure_master(master, settings)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, master.shutdown)
        # Under load, full garbage collections walked every object of mitmproxy and stalled
        # requests for tens of milliseconds. Objects alive after start-up are frozen out of them.
        loop.call_later(FREEZE_AFTER_SECONDS, _freeze_startup_objects)
        audit.emit(
            "service.started",
            outcome=AuditOutcome.INFO,
            actor=SERVICE,
            details={"settings": settings.redacted(), "nameservers": nameservers},
        )
        logger.info(
            "proxy %s started on %s (transparent %d, explicit %d, dns %d); TLS inspection %s",
            settings.host_id,
            settings.gateway_address,
            settings.proxy_transparent_port,
            settings.proxy_explicit_port,
            settings.proxy_dns_port,
            "on" if settings.tls_inspection else "off",
        )
        state_task = asyncio.create_task(
            _publish_state_periodically(nats, settings.host_id), name="proxy-state"
        )
        try:
            await master.run()
        finally:
            state_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state_task
            await publish_state(nats, settings.host_id, running=False)
        audit.emit("service.stopped", outcome=AuditOutcome.INFO, actor=SERVICE)
        logger.info("proxy %s stopped", settings.host_id)
    finally:
        await audit.close()
        await redis_client.aclose()
        await nats.drain()


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `agent-runner-proxy`."""
    try:
        settings = load_settings(ProxySettings, sys.argv[1:] if argv is None else argv)
    except ConfigurationError as exc:
        print(f"agent-runner-proxy: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure_logging(service=SERVICE, host=settings.host_id, level=settings.log_level)
    # mitmproxy logs every connection at INFO; the filter writes one line per decision.
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    try:
        asyncio.run(run(settings))
    except (CommonError, ValueError, OSError) as exc:
        logger.critical("proxy cannot run: %s", exc)
        sys.exit(1)
