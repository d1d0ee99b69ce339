"""The gateway's agent store: libs/common's AgentStore with record reads sent in pipelines.

Most gateway routes read one agent record per request. `GatewayAgentStore.get` sends those
GET commands through a CommandBatcher (services/api/redis_batch.py), so the reads of the
requests in one event-loop turn share one pipeline. The reads use a client of their own,
without a socket timeout, because the batcher bounds each pipeline by --nats-timeout. Every
other method is AgentStore's own and uses the store's client.
"""

from __future__ import annotations

import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common import store
from libs.common.errors import StoreError
from libs.common.messages import AgentRecord
from libs.common.settings import CommonSettings
from services.api.redis_batch import CommandBatcher


def connect_read_redis(settings: CommonSettings) -> redis.Redis:
    """Return the client for batched record reads: the store's settings without a read timeout."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return redis.Redis.from_url(
        settings.redis_url,
        password=password,
        # redis-py 8 applies a 5 s read timeout unless socket_timeout is None.
        socket_timeout=None,
        socket_connect_timeout=settings.nats_timeout,
        health_check_interval=30,
        decode_responses=True,
    )


class GatewayAgentStore(store.AgentStore):
    """An AgentStore whose `get` shares pipelines with the other reads of the same loop turn.

    The `reads` client sends the GET commands, and each pipeline of them fails after
    `read_timeout` seconds.
    """

    def __init__(self, client: redis.Redis, *, reads: redis.Redis, read_timeout: float) -> None:
        super().__init__(client)
        self._reads = CommandBatcher(reads, timeout=read_timeout)

    async def get(self, agent_id: str) -> AgentRecord | None:
        """Return the record, or None when no agent has this id.

        Raises StoreError when Redis fails, times out or contains an invalid record.
        """
        # NOTE: this repeats AgentStore.get with the batched read, and so uses the key and
        # parser that libs/common/store.py keeps private; change both together.
        try:
            raw = await self._reads.call("GET", store._record_key(agent_id))
        except RedisError as exc:
            raise StoreError(f"cannot read agent {agent_id!r}: {exc}") from exc
        return None if raw is None else self._parse(agent_id, raw)
