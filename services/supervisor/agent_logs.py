"""Log collection: follow each agent's output, clean it, rate-limit it and store it in Redis.

Pipeline per agent, from the moment its container starts until it is removed:

1. one thread per stream (stdout, stderr) follows Docker's log stream and joins its frames
   into lines of at most 4 x --log-max-line-length bytes (log_lines.LineAssembler);
2. the per-agent token bucket (--log-rate-limit, --log-rate-burst) drops lines over the
   limit and counts them;
3. each kept line is escaped, redacted and truncated (libs/common/sanitize.clean_line) and
   becomes a LogLine record with agent id, container id, stream and Docker's timestamp;
4. a task on the event loop appends the records to a capped Redis list (--log-keep-lines)
   with the agent's counts, and audits drops at most once per DROP_REPORT_INTERVAL and once
   more when the streams end.

Redis keys: `agent-runner:log-lines:<agent>` (list of LogLine JSON, oldest first) and
`agent-runner:log-counts:<agent>` (hash of LogCounts fields and `last_time_<stream>`, the
Docker time of the last line read from each stream). Both expire --final-record-ttl seconds
after the agent stops, or --max-container-lifetime seconds later when no supervisor finished
the agent. After a supervisor restart, `follow` resumes each stream after its last time, so
an adopted agent keeps one log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import redis.asyncio as redis
from pydantic import ValidationError
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from libs.common import logs
from libs.common.audit import AuditPublisher
from libs.common.errors import StoreError
from libs.common.messages import AuditOutcome, LogCounts, LogLine, LogStream
from libs.common.sanitize import SecretRedactor, clean_line, max_line_bytes
from libs.common.store import PREFIX
from services.supervisor.docker_adapter import DockerAdapter, LogFollow
from services.supervisor.errors import DockerUnavailable
from services.supervisor.log_lines import LineAssembler, RawLine, TokenBucket
from services.supervisor.settings import SupervisorSettings

logger = logging.getLogger(__name__)

ACTOR = "supervisor"
DROPPED_EVENT = "agent.logs_dropped"
DROP_REASON = "log_rate_limited"
# At most one agent.logs_dropped event per agent in this many seconds, so a flood of lines
# does not become a flood of audit events.
DROP_REPORT_INTERVAL = 10.0
# Records waiting for Redis; more are dropped and counted. The rate limit keeps the queue
# short unless Redis stalls, and the limit bounds memory to about QUEUE_LIMIT x 4 x
# --log-max-line-length bytes per agent when it does.
QUEUE_LIMIT = 2000
BATCH_SIZE = 500
# Seconds a finished agent's streams get to deliver the output Docker still has, before
# they are closed.
FINISH_WAIT = 2.0
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
_COUNT_FIELDS = ("lines", "stored", "dropped", "truncated", "redacted")


def lines_key(agent_id: str) -> str:
    """Return the Redis key of an agent's stored log records."""
    return f"{PREFIX}log-lines:{agent_id}"


def counts_key(agent_id: str) -> str:
    """Return the Redis key of an agent's log counts."""
    return f"{PREFIX}log-counts:{agent_id}"


@dataclass(kw_only=True)
class _Counts:
    lines: int = 0
    stored: int = 0
    dropped: int = 0
    truncated: int = 0
    redacted: int = 0
    # Docker time of the last line read from each stream, stored or dropped.
    last_times: dict[LogStream, datetime] = field(default_factory=dict)

    def copy(self) -> _Counts:
        return replace(self, last_times=dict(self.last_times))

    def as_message(self) -> LogCounts:
        return LogCounts(**{name: getattr(self, name) for name in _COUNT_FIELDS})

    def as_hash(self) -> dict[FieldT, EncodableT]:
        fields: dict[FieldT, EncodableT] = {
            name: str(getattr(self, name)) for name in _COUNT_FIELDS
        }
        for stream, time in self.last_times.items():
            fields[f"last_time_{stream.value}"] = time.isoformat()
        return fields


def _counts_from_hash(agent_id: str, fields: dict[str, str]) -> _Counts:
    try:
        return _Counts(
            **{name: int(fields.get(name, 0)) for name in _COUNT_FIELDS},
            last_times={
                stream: datetime.fromisoformat(fields[f"last_time_{stream.value}"])
                for stream in LogStream
                if fields.get(f"last_time_{stream.value}")
            },
        )
    except ValueError as exc:
        raise StoreError(f"log counts of agent {agent_id!r} in Redis are invalid: {exc}") from exc


def _read_before(line: RawLine, resume_after: datetime | None) -> bool:
    return resume_after is not None and line.time is not None and line.time <= resume_after


class _Follower:
    """Follow, clean and store the output of one agent's container."""

    def __init__(
        self,
        collector: AgentLogCollector,
        *,
        agent_id: str,
        container_id: str,
        counts: _Counts,
    ) -> None:
        self.collector = collector
        self.agent_id = agent_id
        self.container_id = container_id
        self.counts = counts
        self._settings = collector.settings
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[LogLine] = asyncio.Queue(maxsize=QUEUE_LIMIT)
        self._bucket = TokenBucket(
            rate=self._settings.log_rate_limit, burst=self._settings.log_rate_burst
        )
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._streams: dict[LogStream, LogFollow] = {}
        self._pending_dropped = 0
        self._unreported_dropped = 0
        self._last_report = self._loop.time()
        # No agent runs longer than --max-container-lifetime, so this expiry removes only the
        # log of an agent whose supervisor never started again to finish it.
        self._live_ttl = self._settings.max_container_lifetime + self._settings.final_record_ttl
        self._written: dict[FieldT, EncodableT] = {}
        self._running_threads = len(LogStream)
        self._ended = asyncio.Event()
        self._threads = [
            threading.Thread(
                target=self._follow,
                args=(stream,),
                name=f"logs-{agent_id}-{stream.value}",
                daemon=True,
            )
            for stream in LogStream
        ]
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write(), name=f"logs-{self.agent_id}")
        for thread in self._threads:
            thread.start()

    async def stop(self, *, wait: float) -> None:
        """Let the streams end by themselves for `wait` seconds, close them, store the rest."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), wait)
        self._closing.set()
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            await asyncio.to_thread(stream.close)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), FINISH_WAIT)
        if not self._ended.is_set():
            logger.warning(
                "log streams of agent %s did not end; their last lines may be missing",
                self.agent_id,
                extra={logs.AGENT_ID: self.agent_id},
            )
            self._ended.set()
        if self._writer is not None:
            await self._writer

    # Threads: one per stream.

    def _follow(self, stream: LogStream) -> None:
        redactor = SecretRedactor()
        delay = RECONNECT_MIN_SECONDS
        with self._lock:
            resume_after = self.counts.last_times.get(stream)
        try:
            while not self._closing.is_set():
                resume_after = self._read_stream(stream, redactor, resume_after)
                if self._closing.is_set() or not self._container_running():
                    break
                # The stream broke off while the container runs (a daemon restart, say).
                self._closing.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
        except Exception:
            logger.exception(
                "following %s of agent %s failed unexpectedly",
                stream.value,
                self.agent_id,
                extra={logs.AGENT_ID: self.agent_id},
            )
        finally:
            self._call_soon(self._thread_ended)

    def _read_stream(
        self, stream: LogStream, redactor: SecretRedactor, resume_after: datetime | None
    ) -> datetime | None:
        """Read a stream until its connection ends, and return the time of the last line read."""
        assembler = LineAssembler(limit=max_line_bytes(self._settings.log_max_line_length))

        # The connection starts a second early, so no line is missed if the daemon rounds
        # `since`, and the lines up to `resume_after` are skipped because they were read
        # before. Only the lines at the start of a connection are compared, because later
        # lines in the same microsecond are new.
        since = None if resume_after is None else resume_after - timedelta(seconds=1)
        replaying = resume_after is not None
        last_time = resume_after

        try:
            follow = self.collector.docker.follow_logs(
                self.container_id, stream=stream.value, since=since
            )
            with self._lock:
                self._streams[stream] = follow
            if self._closing.is_set():
                follow.close()
            for frame in follow.frames():
                for line in assembler.feed(frame):
                    if replaying and _read_before(line, resume_after):
                        continue
                    replaying = False
                    self._take_line(stream, line, redactor)
                    last_time = line.time or last_time
        except DockerUnavailable as exc:
            logger.warning(
                "log stream %s of agent %s ended: %s",
                stream.value,
                self.agent_id,
                exc,
                extra={logs.AGENT_ID: self.agent_id, logs.CONTAINER_ID: self.container_id},
            )

        last = assembler.flush()
        if last is not None and not (replaying and _read_before(last, resume_after)):
            self._take_line(stream, last, redactor)
            last_time = last.time or last_time
        return last_time

    def _take_line(self, stream: LogStream, line: RawLine, redactor: SecretRedactor) -> None:
        with self._lock:
            self.counts.lines += 1
            if line.time is not None:
                self.counts.last_times[stream] = line.time
            allowed = self._bucket.take()
            if not allowed:
                self.counts.dropped += 1
                self._pending_dropped += 1
                self._unreported_dropped += 1
                dropped_before = 0
            else:
                dropped_before = self._pending_dropped
                self._pending_dropped = 0
        if not allowed:
            redactor.skip(line.data)
            return

        cleaned = clean_line(
            line.data,
            max_length=self._settings.log_max_line_length,
            redactor=redactor,
            truncated=line.truncated,
        )
        record = LogLine(
            stream=stream,
            time=line.time,
            text=cleaned.text,
            truncated=cleaned.truncated,
            agent_id=self.agent_id,
            container_id=self.container_id,
            redactions=cleaned.redactions,
            dropped_before=dropped_before,
        )
        self._call_soon(self._enqueue, record)

    def _container_running(self) -> bool:
        try:
            status = self.collector.docker.status(self.container_id)
        except DockerUnavailable as exc:
            logger.warning("cannot inspect container %s: %s", self.container_id[:12], exc)
            return True  # reconnect, which fails again with a warning while Docker is down
        return status is not None and status.running

    def snapshot(self) -> _Counts:
        """Return a copy of the counts that the stream threads keep changing."""
        with self._lock:
            return self.counts.copy()

    def _call_soon(self, callback: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            self._closing.set()  # the event loop has closed because the supervisor is exiting

    # Event loop side.

    def _thread_ended(self) -> None:
        self._running_threads -= 1
        if self._running_threads == 0:
            self._ended.set()

    def _enqueue(self, record: LogLine) -> None:
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            with self._lock:
                lost = 1 + record.dropped_before
                self.counts.dropped += 1
                self._pending_dropped += lost
                self._unreported_dropped += 1

    async def _write(self) -> None:
        try:
            await self._write_until_ended()
        except Exception:
            logger.exception(
                "storing the log of agent %s failed unexpectedly; its later lines are lost",
                self.agent_id,
                extra={logs.AGENT_ID: self.agent_id},
            )

    async def _write_until_ended(self) -> None:
        while True:
            batch: list[LogLine] = []
            with contextlib.suppress(TimeoutError):
                batch.append(await asyncio.wait_for(self._queue.get(), 0.5))
            while batch and len(batch) < BATCH_SIZE and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            ended = self._ended.is_set() and self._queue.empty()
            await self._store(batch)
            self._report_drops(force=ended)
            if ended:
                return

    async def _store(self, batch: list[LogLine]) -> None:
        counts = self.snapshot()
        counts.stored += len(batch)
        counts.truncated += sum(1 for record in batch if record.truncated)
        counts.redacted += sum(1 for record in batch if record.redactions)
        fields = counts.as_hash()
        if not batch and fields == self._written:
            return

        try:
            async with self.collector.redis.pipeline(transaction=True) as pipe:
                if batch:
                    key = lines_key(self.agent_id)
                    pipe.rpush(key, *(record.model_dump_json() for record in batch))
                    pipe.ltrim(key, -self._settings.log_keep_lines, -1)
                    pipe.expire(key, self._live_ttl)
                pipe.hset(counts_key(self.agent_id), mapping=fields)
                pipe.expire(counts_key(self.agent_id), self._live_ttl)
                await pipe.execute()
        except RedisError as exc:
            logger.error(
                "cannot store %d log lines of agent %s: %s; counted as dropped",
                len(batch),
                self.agent_id,
                exc,
                extra={logs.AGENT_ID: self.agent_id},
            )
            with self._lock:
                self.counts.dropped += len(batch)
                self._unreported_dropped += len(batch)
            return
        with self._lock:
            self.counts.stored = counts.stored
            self.counts.truncated = counts.truncated
            self.counts.redacted = counts.redacted
        self._written = fields

    def _report_drops(self, *, force: bool) -> None:
        now = self._loop.time()
        with self._lock:
            dropped = self._unreported_dropped
            total = self.counts.dropped
            if not dropped or (not force and now - self._last_report < DROP_REPORT_INTERVAL):
                return
            self._unreported_dropped = 0
        self._last_report = now
        logger.warning(
            "dropped %d log lines of agent %s over the log rate limit (%d so far)",
            dropped,
            self.agent_id,
            total,
            extra={logs.AGENT_ID: self.agent_id, logs.REASON: DROP_REASON},
        )
        self.collector.audit.emit(
            DROPPED_EVENT,
            outcome=AuditOutcome.DENIED,
            actor=ACTOR,
            agent_id=self.agent_id,
            reason_code=DROP_REASON,
            details={
                "container_id": self.container_id,
                "dropped": dropped,
                "dropped_total": total,
            },
        )


class AgentLogCollector:
    """Follow the output of this host's agents and serve what was stored."""

    def __init__(
        self,
        settings: SupervisorSettings,
        *,
        docker: DockerAdapter,
        redis_client: redis.Redis,
        audit: AuditPublisher,
    ) -> None:
        self.settings = settings
        self.docker = docker
        self.redis = redis_client
        self.audit = audit
        self._followers: dict[str, _Follower] = {}

    def following(self, agent_id: str) -> bool:
        """Return whether the output of `agent_id` is being followed."""
        return agent_id in self._followers

    async def follow(self, agent_id: str, container_id: str) -> None:
        """Start following a container's output, after the last line stored for the agent.

        Following an agent twice is a no-op. Raises StoreError when Redis fails.
        """
        if agent_id in self._followers:
            return
        stored = await self._read_counts(agent_id)
        counts = _Counts() if stored is None else stored
        follower = _Follower(self, agent_id=agent_id, container_id=container_id, counts=counts)
        self._followers[agent_id] = follower
        follower.start()
        logger.debug("following output of agent %s", agent_id, extra={logs.AGENT_ID: agent_id})

    async def finish(self, agent_id: str, *, wait: float = FINISH_WAIT) -> None:
        """Store the last output of a stopped agent and keep its log for --final-record-ttl.

        `wait` is how long the streams may still deliver output before they are closed.
        """
        follower = self._followers.pop(agent_id, None)
        if follower is not None:
            await follower.stop(wait=wait)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.expire(lines_key(agent_id), self.settings.final_record_ttl)
                pipe.expire(counts_key(agent_id), self.settings.final_record_ttl)
                await pipe.execute()
        except RedisError as exc:
            logger.error(
                "cannot set the expiry of the log of agent %s: %s",
                agent_id,
                exc,
                extra={logs.AGENT_ID: agent_id},
            )

    async def close(self) -> None:
        """Stop following every agent and store what was read; the agents keep running."""
        followers = list(self._followers.values())
        self._followers.clear()
        await asyncio.gather(*(follower.stop(wait=0) for follower in followers))

    async def lines(self, agent_id: str, *, tail: int) -> list[LogLine] | None:
        """Return the last `tail` stored lines, or None when none were ever stored.

        Raises StoreError when Redis fails or contains a record that is not a LogLine.
        """
        try:
            raws = await self.redis.lrange(lines_key(agent_id), -tail, -1)
        except RedisError as exc:
            raise StoreError(f"cannot read the log of agent {agent_id!r}: {exc}") from exc
        if not raws and not self.following(agent_id) and await self._read_counts(agent_id) is None:
            return None
        try:
            return [LogLine.model_validate_json(raw) for raw in raws]
        except ValidationError as exc:
            raise StoreError(f"log of agent {agent_id!r} in Redis is invalid: {exc}") from exc

    async def counts(self, agent_id: str) -> LogCounts | None:
        """Return the agent's log counts, or None when its output was never collected."""
        follower = self._followers.get(agent_id)
        if follower is not None:
            # The follower's counts include the lines read since the last write to Redis.
            return follower.snapshot().as_message()
        stored = await self._read_counts(agent_id)
        return None if stored is None else stored.as_message()

    async def _read_counts(self, agent_id: str) -> _Counts | None:
        try:
            fields = await self.redis.hgetall(counts_key(agent_id))
        except RedisError as exc:
            raise StoreError(f"cannot read the log counts of agent {agent_id!r}: {exc}") from exc
        if not fields:
            return None
        return _counts_from_hash(agent_id, {str(k): str(v) for k, v in fields.items()})
