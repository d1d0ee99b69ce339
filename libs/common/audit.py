"""Audit-event publisher: every service reports what it did to the JetStream `AUDIT` stream.

`emit` never blocks the caller and never raises: events wait in a bounded in-memory queue
and a background task publishes them with the event id as `Nats-Msg-Id`, retrying until
JetStream acknowledges. The stream persists events while the audit sink is down, and the
server drops a retried event that had already arrived within the duplicate window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats
from nats.js import JetStreamContext

from libs.common import logs
from libs.common.bus import encode
from libs.common.messages import AuditEvent, AuditOutcome

logger = logging.getLogger(__name__)

RETRY_MIN_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0


class AuditPublisher:
    """Queue audit events and publish them to JetStream in the background."""

    def __init__(
        self,
        jetstream: JetStreamContext,
        *,
        service: str,
        host: str,
        max_queue: int = 100_000,
        ack_timeout: float = 5.0,
    ) -> None:
        self._jetstream = jetstream
        self._service = service
        self._host = host
        self._ack_timeout = ack_timeout
        self._queue: asyncio.Queue[AuditEvent] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.published = 0

    def start(self) -> None:
        """Start the background publishing task."""
        self._task = asyncio.create_task(self._run(), name=f"audit-publisher-{self._service}")

    def emit(
        self,
        event_type: str,
        *,
        outcome: AuditOutcome,
        actor: str,
        agent_id: str | None = None,
        correlation_id: str | None = None,
        reason_code: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> AuditEvent:
        """Queue one event for publishing and return it; a full queue drops it loudly."""
        event = AuditEvent(
            service=self._service,
            host=self._host,
            type=event_type,
            actor=actor,
            outcome=outcome,
            agent_id=agent_id,
            correlation_id=correlation_id or logs.current_correlation_id(),
            reason_code=reason_code,
            details=details or {},
        )
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            logger.error(
                "audit queue full; dropped event %s %s (%d dropped so far)",
                event.type,
                event.event_id,
                self.dropped,
                extra={logs.AGENT_ID: agent_id},
            )
        return event

    async def close(self, *, timeout: float = 10.0) -> None:
        """Publish what is queued, waiting at most `timeout` seconds, then stop."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            logger.error("audit publisher stopped with %d events unpublished", self._queue.qsize())
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._publish_until_acknowledged(event)
            finally:
                self._queue.task_done()

    async def _publish_until_acknowledged(self, event: AuditEvent) -> None:
        delay = RETRY_MIN_SECONDS
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._jetstream.publish(
                    event.subject,
                    encode(event),
                    timeout=self._ack_timeout,
                    headers={"Nats-Msg-Id": event.event_id},
                )
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                logger.warning(
                    "publishing audit event %s %s failed (attempt %d): %s; retrying in %.1f s",
                    event.type,
                    event.event_id,
                    attempt,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            self.published += 1
            logger.debug("published audit event %s %s", event.type, event.event_id)
            return
