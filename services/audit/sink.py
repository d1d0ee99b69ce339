"""The audit sink's consume loop: fetch a batch from JetStream, write it, fsync, then ack it.

The folder, not the consumer, decides where reading resumes: at every start the durable
consumer is created again to deliver from the JetStream sequence after the newest one in the
files. A durable consumer left as it was would deliver the unacknowledged messages of a killed
run only after their ack wait, behind newer ones. Starting it again from the files keeps the
file order equal to the stream order. Events that still arrive twice (a publisher that
retried after the server's duplicate window) are dropped by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from libs.common.audit_records import CheckpointReason
from libs.common.errors import BusError
from libs.common.messages import AUDIT_STREAM, AUDIT_SUBJECTS, AuditEvent
from services.audit.retention import delete_segments, plan_retention
from services.audit.segments import SegmentWriter
from services.audit.settings import AuditSettings

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_SECONDS = 0.5
RETENTION_CHECK_SECONDS = 600.0
# Far longer than one write and fsync; a redelivery after it would be dropped as a duplicate.
ACK_WAIT_SECONDS = 120.0


class AuditSink:
    """Consumes the AUDIT stream into one audit folder."""

    def __init__(
        self, settings: AuditSettings, *, writer: SegmentWriter, jetstream: JetStreamContext
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.jetstream = jetstream
        self.written = 0
        self.duplicates = 0
        self.invalid = 0
        self._last_checkpoint = time.monotonic()
        self._last_retention = 0.0

    async def subscribe(self) -> JetStreamContext.PullSubscription:
        """Create the durable consumer from the folder's position and bind to it."""
        try:
            info = await self.jetstream.stream_info(AUDIT_STREAM)
        except nats.js.errors.Error as exc:
            raise BusError(f"cannot read stream {AUDIT_STREAM!r}: {exc}") from exc
        head = self.writer.head.stream_seq
        if info.state.last_seq < head:
            logger.error(
                "stream %s ends at sequence %d, before the %d in the audit folder, so it was "
                "recreated; reading it from the start and dropping repeated event ids",
                AUDIT_STREAM,
                info.state.last_seq,
                head,
            )
            self.writer.head.stream_seq = head = 0
        if info.state.first_seq > head + 1:
            logger.error(
                "stream %s starts at sequence %d: events %d to %d were removed by its limits "
                "before the sink stored them",
                AUDIT_STREAM,
                info.state.first_seq,
                head + 1,
                info.state.first_seq - 1,
            )
        name = self.settings.audit_consumer
        config = ConsumerConfig(
            name=name,
            durable_name=name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=head + 1,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_SECONDS,
            max_ack_pending=self.settings.audit_batch_size * 4,
            filter_subject=AUDIT_SUBJECTS,
        )
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.jetstream.delete_consumer(AUDIT_STREAM, name)
            await self.jetstream.add_consumer(AUDIT_STREAM, config)
            subscription = await self.jetstream.pull_subscribe_bind(
                durable=name, stream=AUDIT_STREAM
            )
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise BusError(f"cannot create consumer {name!r} on {AUDIT_STREAM!r}: {exc}") from exc
        logger.info("consuming %s from sequence %d as %s", AUDIT_STREAM, head + 1, name)
        return subscription

    async def run(
        self, subscription: JetStreamContext.PullSubscription, stopped: asyncio.Event
    ) -> None:
        """Store batches until `stopped` is set; the batch in progress is finished first."""
        await self.apply_retention()
        while not stopped.is_set():
            try:
                messages = await subscription.fetch(
                    self.settings.audit_batch_size, timeout=FETCH_TIMEOUT_SECONDS
                )
            except (TimeoutError, nats.errors.TimeoutError):
                messages = []
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                logger.warning("fetching from %s failed: %s; retrying in 1 s", AUDIT_STREAM, exc)
                await asyncio.sleep(1)
                continue
            if messages:
                await self.store(messages)
            await self._checkpoint_if_due()
            if self.writer.rotate_if_full() or self._retention_due():
                await self.apply_retention()

    async def store(self, messages: list[Msg]) -> None:
        """Write one batch, fsync it, then acknowledge every message of it."""
        for message in messages:
            self._add(message)
        await asyncio.to_thread(self.writer.sync)
        for message in messages:
            try:
                await message.ack()
            except nats.errors.Error as exc:
                # The record is on disk; a redelivery after the ack wait is a duplicate.
                logger.warning("cannot acknowledge an audit message: %s", exc)

    def _add(self, message: Msg) -> None:
        stream_seq = message.metadata.sequence.stream
        if stream_seq > self.writer.head.stream_seq + 1:
            logger.error(
                "JetStream sequences %d to %d are missing from %s; its limits removed them",
                self.writer.head.stream_seq + 1,
                stream_seq - 1,
                AUDIT_STREAM,
            )
        try:
            event = AuditEvent.model_validate_json(message.data)
            if event.subject != message.subject:
                # NATS permissions can bind a service to audit.<service>.>, which makes the
                # subject the authenticated part; a body that claims another one is suspect.
                raise ValueError(
                    f"event names subject {event.subject!r} but arrived on {message.subject!r}"
                )
            added = self.writer.add_event(
                stream_seq=stream_seq,
                subject=message.subject,
                event=event.model_dump(mode="json"),
            )
        except (ValidationError, ValueError) as exc:
            self.invalid += 1
            logger.warning(
                "message %d on %s is not a valid audit event; stored as invalid: %s",
                stream_seq,
                message.subject,
                str(exc).splitlines()[0],
            )
            added = self.writer.add_invalid(
                stream_seq=stream_seq,
                subject=message.subject,
                data=message.data,
                error=str(exc),
            )
        if added:
            self.written += 1
        else:
            self.duplicates += 1
            logger.info("dropped a repeated audit message (JetStream sequence %d)", stream_seq)

    async def _checkpoint_if_due(self) -> None:
        elapsed = time.monotonic() - self._last_checkpoint
        if elapsed < self.settings.audit_checkpoint_interval:
            return
        self._last_checkpoint = time.monotonic()
        if self.writer.records_since_checkpoint == 0:
            return
        self.writer.add_checkpoint(CheckpointReason.INTERVAL)
        await asyncio.to_thread(self.writer.sync)

    def _retention_due(self) -> bool:
        return time.monotonic() - self._last_retention >= RETENTION_CHECK_SECONDS

    async def apply_retention(self) -> None:
        """Record, then delete, the segments that exceed --audit-retention-days or -max-size."""
        self._last_retention = time.monotonic()
        plan = plan_retention(
            self.writer.directory,
            now=datetime.now(UTC),
            retention_days=self.settings.audit_retention_days,
            max_size=self.settings.audit_max_size,
        )
        if plan is None:
            return
        self.writer.add_retention(removed=plan.names, first_retained_seq=plan.first_retained_seq)
        await asyncio.to_thread(self.writer.sync)
        await asyncio.to_thread(delete_segments, plan)
