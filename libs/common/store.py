"""Agent records in Redis, shared by the gateway (reads, creates) and the supervisor (updates).

Keeping agent state out of process memory is what lets the gateway or a supervisor restart
without losing an agent. Keys:

- `agent-runner:agent:<id>`: the record as JSON; records in a final state expire after
  `final_record_ttl` seconds.
- `agent-runner:agents`: sorted set of every agent id by creation time, for listing.
- `agent-runner:host:<host>:active`: ids of the agents a host has not finished yet, which
  the supervisor reconciles after a restart.
- `agent-runner:cache-hosts`: hosts whose image cache has entries; the supervisor keeps it
  (services/supervisor/cache.py) and the gateway reads it to purge every host.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as redis
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from libs.common.errors import StoreError
from libs.common.messages import FINAL_STATES, AgentRecord
from libs.common.settings import CommonSettings

logger = logging.getLogger(__name__)

PREFIX = "agent-runner:"
INDEX_KEY = f"{PREFIX}agents"
CACHE_HOSTS_KEY = f"{PREFIX}cache-hosts"


def _record_key(agent_id: str) -> str:
    return f"{PREFIX}agent:{agent_id}"


def _host_key(host_id: str) -> str:
    return f"{PREFIX}host:{host_id}:active"


def connect_redis(settings: CommonSettings, *, retries: int | None = None) -> redis.Redis:
    """Return a Redis client for the configured URL; connecting happens on first use.

    `retries` replaces redis-py's default of ten retries with backoff, for callers that must
    fail fast (the proxy denies a request when it cannot count it).
    """
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    options: dict[str, Any] = {}
    if retries is not None:
        options["retry"] = Retry(NoBackoff(), retries)
    return redis.Redis.from_url(
        settings.redis_url,
        password=password,
        socket_timeout=settings.nats_timeout,
        socket_connect_timeout=settings.nats_timeout,
        health_check_interval=30,
        decode_responses=True,
        **options,
    )


class AgentStore:
    """Read and write agent records; Redis errors become StoreError."""

    def __init__(self, client: redis.Redis, *, final_record_ttl: int = 7 * 24 * 3600) -> None:
        self._redis = client
        self._final_record_ttl = final_record_ttl

    async def ping(self) -> None:
        """Raise StoreError when Redis does not respond."""
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise StoreError(f"Redis did not respond to PING: {exc}") from exc

    async def create(self, record: AgentRecord) -> None:
        """Store a new record; raises StoreError if the id already exists."""
        try:
            created = await self._redis.set(
                _record_key(record.agent_id), record.model_dump_json(), nx=True
            )
            if not created:
                raise StoreError(f"agent {record.agent_id!r} already exists")
            await self._redis.zadd(INDEX_KEY, {record.agent_id: record.created_at.timestamp()})
        except RedisError as exc:
            raise StoreError(f"cannot store agent {record.agent_id!r}: {exc}") from exc

    async def put(self, record: AgentRecord) -> None:
        """Replace a record and keep the host's active set in step with its state."""
        key = _record_key(record.agent_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if record.state in FINAL_STATES:
                    pipe.set(key, record.model_dump_json(), ex=self._final_record_ttl)
                    if record.host_id:
                        pipe.srem(_host_key(record.host_id), record.agent_id)
                else:
                    pipe.set(key, record.model_dump_json())
                    if record.host_id:
                        pipe.sadd(_host_key(record.host_id), record.agent_id)
                pipe.zadd(INDEX_KEY, {record.agent_id: record.created_at.timestamp()})
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"cannot update agent {record.agent_id!r}: {exc}") from exc

    async def get(self, agent_id: str) -> AgentRecord | None:
        """Return the record, or None when no agent has this id."""
        try:
            raw = await self._redis.get(_record_key(agent_id))
        except RedisError as exc:
            raise StoreError(f"cannot read agent {agent_id!r}: {exc}") from exc
        return None if raw is None else self._parse(agent_id, raw)

    async def list_recent(self, *, limit: int) -> list[AgentRecord]:
        """Return up to `limit` records, newest first, pruning ids whose record expired."""
        try:
            ids = [str(i) for i in await self._redis.zrevrange(INDEX_KEY, 0, limit - 1)]
            raws = await self._redis.mget([_record_key(i) for i in ids]) if ids else []
            expired = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if expired:
                await self._redis.zrem(INDEX_KEY, *expired)
        except RedisError as exc:
            raise StoreError(f"cannot list agents: {exc}") from exc
        return [self._parse(i, raw) for i, raw in zip(ids, raws, strict=True) if raw is not None]

    async def active_on_host(self, host_id: str) -> list[str]:
        """Return the ids of agents that `host_id` started and has not finished."""
        try:
            members = await self._redis.smembers(_host_key(host_id))
        except RedisError as exc:
            raise StoreError(f"cannot list active agents of host {host_id!r}: {exc}") from exc
        return sorted(str(member) for member in members)

    async def forget_active(self, host_id: str, agent_id: str) -> None:
        """Drop `agent_id` from the host's active set when its record no longer exists."""
        try:
            await self._redis.srem(_host_key(host_id), agent_id)
        except RedisError as exc:
            raise StoreError(f"cannot update active agents of {host_id!r}: {exc}") from exc

    async def cache_hosts(self) -> list[str]:
        """Return the ids of the hosts whose image cache has at least one entry."""
        try:
            members = await self._redis.smembers(CACHE_HOSTS_KEY)
        except RedisError as exc:
            raise StoreError(f"cannot list hosts with cached images: {exc}") from exc
        return sorted(str(member) for member in members)

    async def image_id_for(self, digest: str) -> str | None:
        """Return the image ID that a tarball with `digest` was loaded as, if recorded."""
        try:
            value = await self._redis.get(f"{PREFIX}image:{digest}")
        except RedisError as exc:
            raise StoreError(f"cannot read image index for {digest!r}: {exc}") from exc
        return None if value is None else str(value)

    async def remember_image_id(self, digest: str, image_id: str) -> None:
        """Record that the tarball with `digest` was verified and loaded as `image_id`."""
        try:
            await self._redis.set(f"{PREFIX}image:{digest}", image_id)
        except RedisError as exc:
            raise StoreError(f"cannot write image index for {digest!r}: {exc}") from exc

    async def final_logs(self, agent_id: str) -> str | None:
        """Return the output an earlier version kept at stop, if any.

        Supervisors now keep logs as structured records (services/supervisor/agent_logs.py);
        this key is read only for agents that stopped before the upgrade, until it expires.
        """
        try:
            value = await self._redis.get(f"{PREFIX}logs:{agent_id}")
        except RedisError as exc:
            raise StoreError(f"cannot read logs of agent {agent_id!r}: {exc}") from exc
        return None if value is None else str(value)

    @staticmethod
    def _parse(agent_id: str, raw: str | bytes) -> AgentRecord:
        try:
            return AgentRecord.model_validate_json(raw)
        except ValidationError as exc:
            raise StoreError(f"record of agent {agent_id!r} in Redis is invalid: {exc}") from exc
