"""Entry point of agent-runner-audit, the sink that writes signed, hash-chained audit files.

Pipeline: settings and logging, the signing key (required in production), an exclusive lock on
--audit-dir, recovery of the newest segment, NATS and the AUDIT stream. The verification key is
written next to the segments and announced in the `service.started` event. Then the consume
loop of services.audit.sink runs until SIGTERM or SIGINT, and a signed stop checkpoint ends
the log.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path

from libs.common import bus, logs
from libs.common.audit import AuditPublisher
from libs.common.audit_records import (
    CheckpointSigner,
    generate_signing_key,
    load_signing_key,
    public_key_pem,
    write_public_key,
)
from libs.common.errors import CommonError, ConfigurationError
from libs.common.messages import AuditOutcome
from libs.common.settings import load_settings
from services.audit.segments import SegmentError, SegmentWriter
from services.audit.settings import AuditSettings
from services.audit.sink import AuditSink

logger = logging.getLogger(__name__)

SERVICE = "audit"


def _signer(settings: AuditSettings) -> CheckpointSigner:
    path = settings.signing_key_path
    if settings.audit_signing_key is None and not path.exists():
        signer = generate_signing_key(path)
        logger.warning("generated a new audit signing key in %s (--audit-generate-key)", path)
        return signer
    return load_signing_key(path)


def _lock(directory: Path) -> int:
    """Take an exclusive lock on the folder; raises ConfigurationError when it is held."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(descriptor)
        raise ConfigurationError(
            f"--audit-dir {str(directory)!r} is locked by another audit sink; give each sink "
            "its own folder"
        ) from exc
    return descriptor


async def run(settings: AuditSettings) -> None:
    """Run the sink until SIGTERM or SIGINT."""
    settings.warn_if_relaxed()
    if settings.audit_generate_key:
        logger.warning(
            "--audit-generate-key: the signing key lives next to the log, so the checkpoints "
            "do not protect it against anyone who can write %s",
            settings.audit_dir,
        )
    signer = _signer(settings)
    lock = _lock(settings.audit_dir)
    writer = SegmentWriter(
        settings.audit_dir,
        signer=signer,
        segment_max_bytes=settings.audit_segment_max_bytes,
        recent_ids=settings.audit_recent_ids,
    )
    key_path = write_public_key(settings.audit_dir, signer.public_key)
    logger.info("verification key %s in %s", signer.key_id, key_path)
    writer.open()
    nats = await bus.connect(settings, name=f"{SERVICE}@{settings.host_id}")
    try:
        jetstream = await bus.ensure_audit_stream(nats)
        audit = AuditPublisher(jetstream, service=SERVICE, host=settings.host_id)
        audit.start()
        audit.emit(
            "service.started",
            outcome=AuditOutcome.INFO,
            actor=SERVICE,
            details={
                "settings": settings.redacted(),
                "verification_key_id": signer.key_id,
                "verification_key": public_key_pem(signer.public_key),
            },
        )
        sink = AuditSink(settings, writer=writer, jetstream=jetstream)
        subscription = await sink.subscribe()
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopped.set)
        logger.info("audit %s started", settings.host_id)
        await sink.run(subscription, stopped)
        audit.emit("service.stopped", outcome=AuditOutcome.INFO, actor=SERVICE)
        await audit.close()
        await subscription.unsubscribe()
        logger.info(
            "audit %s stopped: %d records written, %d repeated and %d invalid messages",
            settings.host_id,
            sink.written,
            sink.duplicates,
            sink.invalid,
        )
    finally:
        writer.close()
        os.close(lock)
        await nats.drain()


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `agent-runner-audit`."""
    try:
        settings = load_settings(AuditSettings, sys.argv[1:] if argv is None else argv)
    except ConfigurationError as exc:
        print(f"agent-runner-audit: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure_logging(service=SERVICE, host=settings.host_id, level=settings.log_level)
    try:
        asyncio.run(run(settings))
    except ConfigurationError as exc:
        logger.critical("audit sink cannot start: %s", exc)
        sys.exit(2)
    except (SegmentError, CommonError) as exc:
        logger.critical("audit sink cannot run: %s", exc)
        sys.exit(1)
