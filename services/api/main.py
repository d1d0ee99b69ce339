"""Gateway entry point: load settings, keys and the TLS certificate, then serve with uvicorn.

The gateway serves HTTPS with the context of services/api/tls.py, or plain HTTP when
--insecure-http allows it. Beside it run the certificate reloader (SIGHUP and a file
watcher), with --http-redirect-port a plain HTTP listener that only redirects to HTTPS, and
with --metrics-bind a plain HTTP listener that serves only GET /metrics.
uvicorn keeps handling SIGINT and SIGTERM for the whole process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from typing import NoReturn

import uvicorn

from libs.common import logs
from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.api.app import SERVICE, create_app
from services.api.auth import KeyRing
from services.api.https_redirect import FollowerServer, public_origin, redirect_config
from services.api.metrics import GatewayMetrics, MetricsApp, MetricsKey, check_metrics_key
from services.api.settings import ApiSettings
from services.api.tls import CertificateReloader, create_server_context

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `agent-runner-api`."""
    try:
        settings = load_settings(ApiSettings, sys.argv[1:] if argv is None else argv)
        settings.check_transport()
        keyring = KeyRing.load(
            key_file=settings.api_keys_file,
            plain_keys=settings.api_keys.get_secret_value() if settings.api_keys else None,
        )
        metrics_key = (
            settings.metrics_api_key.get_secret_value() if settings.metrics_api_key else None
        )
        check_metrics_key(metrics_key, keyring)
    except ConfigurationError as exc:
        _exit_on_configuration_error(exc)
    if settings.serves_tls:
        # SIGHUP ends a process by default, and a certificate deploy hook may send one before
        # the reload handler is installed. Ignoring it loses nothing, because the certificate
        # files are read after this point.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.configure_logging(service=SERVICE, host=settings.host_id, level=settings.log_level)

    try:
        reloader = _load_certificate(settings)
        redirect_socket = _bind_redirect_socket(settings)
        metrics_socket = _bind_metrics_socket(settings)
    except ConfigurationError as exc:
        _exit_on_configuration_error(exc)
    if reloader is None:
        _warn_plain_http(settings)

    metrics = GatewayMetrics()
    gateway_config = uvicorn.Config(
        create_app(settings, keyring=keyring, metrics=metrics),
        host=str(settings.listen_address),
        port=settings.listen_port,
        ssl_context_factory=_fixed_context(reloader.context) if reloader else None,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        limit_concurrency=2000,
        timeout_keep_alive=5,
    )
    with asyncio.Runner(loop_factory=gateway_config.get_loop_factory()) as runner:
        runner.run(
            _serve(
                gateway_config,
                reloader=reloader,
                redirect_socket=redirect_socket,
                metrics_listener=_metrics_listener(metrics_socket, metrics, metrics_key),
                settings=settings,
            )
        )


def _exit_on_configuration_error(exc: ConfigurationError) -> NoReturn:
    print(f"agent-runner-api: {exc}", file=sys.stderr)
    sys.exit(2)


def _load_certificate(settings: ApiSettings) -> CertificateReloader | None:
    """Create the TLS context and load the certificate; None when serving plain HTTP."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    reloader = CertificateReloader(
        create_server_context(),
        cert_path=settings.tls_cert,
        key_path=settings.tls_key,
        check_interval=settings.tls_check_interval,
    )
    reloader.load()
    return reloader


def _bind_redirect_socket(settings: ApiSettings) -> socket.socket | None:
    """Bind the redirect listener's socket now, so a port in use stops the start with its name."""
    if settings.http_redirect_port is None:
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((str(settings.listen_address), settings.http_redirect_port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"--http-redirect-port={settings.http_redirect_port}: cannot listen on "
            f"{settings.listen_address}:{settings.http_redirect_port}: {exc.strerror or exc}"
        ) from exc
    return sock


def _bind_metrics_socket(settings: ApiSettings) -> socket.socket | None:
    """Bind the --metrics-bind socket now, so a port in use stops the start with its name."""
    if settings.metrics_bind is None:
        return None
    address, port = settings.metrics_address_port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((str(address), port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"--metrics-bind={settings.metrics_bind}: cannot listen there: {exc.strerror or exc}"
        ) from exc
    return sock


def _metrics_listener(
    sock: socket.socket | None, metrics: GatewayMetrics, key: str | None
) -> tuple[uvicorn.Config, socket.socket] | None:
    """Return the uvicorn configuration and socket of the --metrics-bind listener."""
    if sock is None:
        return None
    config = uvicorn.Config(
        MetricsApp(metrics, key=MetricsKey(key) if key else None),
        lifespan="off",
        ws="none",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        limit_concurrency=100,
        timeout_keep_alive=5,
    )
    return config, sock


def _fixed_context(
    context: ssl.SSLContext,
) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    """Return a uvicorn `ssl_context_factory` that hands over `context` itself.

    uvicorn would otherwise build its own context from file names. The reloader loads new
    certificates into this very context, which the listening socket keeps using.
    """

    def factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return context

    return factory


def _warn_plain_http(settings: ApiSettings) -> None:
    exposure = (
        "keep it on loopback behind a reverse proxy that terminates TLS"
        if settings.listen_address.is_loopback
        else f"and {settings.listen_address} is not a loopback address, so anyone on that "
        "network can read them"
    )
    logger.warning(
        "serving plain HTTP on %s:%s because --insecure-http is set: API keys and agent "
        "traffic cross the network unencrypted; %s",
        settings.listen_address,
        settings.listen_port,
        exposure,
    )


async def _serve(
    gateway_config: uvicorn.Config,
    *,
    reloader: CertificateReloader | None,
    redirect_socket: socket.socket | None,
    metrics_listener: tuple[uvicorn.Config, socket.socket] | None,
    settings: ApiSettings,
) -> None:
    """Serve the gateway with the reloader, the redirect and the metrics listeners beside it."""
    gateway = uvicorn.Server(gateway_config)
    background: list[asyncio.Task[None]] = []

    if reloader is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.reload_on_signal)
        background.append(asyncio.create_task(reloader.watch(), name="tls-certificate-watch"))
    if redirect_socket is not None and settings.public_host is not None:
        origin = public_origin(settings.public_host, settings.public_port or settings.listen_port)
        redirect = FollowerServer(redirect_config(origin=origin), leader=gateway)
        background.append(
            asyncio.create_task(redirect.serve(sockets=[redirect_socket]), name="https-redirect")
        )
        logger.info(
            "redirecting plain HTTP on %s:%s to %s",
            settings.listen_address,
            settings.http_redirect_port,
            origin,
        )
    if metrics_listener is not None:
        metrics_config, metrics_socket = metrics_listener
        metrics_server = FollowerServer(metrics_config, leader=gateway)
        background.append(
            asyncio.create_task(metrics_server.serve(sockets=[metrics_socket]), name="metrics")
        )
        logger.info("metrics on http://%s/metrics", settings.metrics_bind)
    for task in background:
        task.add_done_callback(_log_task_failure)

    try:
        await gateway.serve()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    logger.error("background task %s of the gateway failed: %r", task.get_name(), task.exception())
