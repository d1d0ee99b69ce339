"""Pipelined Redis commands of the gateway against the Redis that scripts/deps.sh starts.

Every key lives under a prefix of its own test, which deletes it afterwards. The failure tests
point a client at a loopback port where nothing listens.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from libs.common import store
from libs.common.errors import StoreError
from libs.common.messages import AgentRecord, AgentState, new_agent_id
from libs.common.settings import CommonSettings, load_settings
from services.api.ratelimit import connect_limiter_redis
from services.api.records import GatewayAgentStore
from services.api.redis_batch import CommandBatcher, ScriptBatcher
from tests.support.stack import free_port

pytestmark = pytest.mark.integration

CALLERS = 50
TIMEOUT = 5.0


@pytest.fixture
async def client() -> AsyncIterator[redis.Redis]:
    value = connect_limiter_redis(load_settings(CommonSettings, []))
    yield value
    await value.aclose()


@pytest.fixture
async def prefix(client: redis.Redis) -> AsyncIterator[str]:
    value = f"agent-runner:test:gateway-batch:{uuid.uuid4().hex}:"
    yield value
    keys = [key async for key in client.scan_iter(match=f"{value}*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def unreachable() -> AsyncIterator[redis.Redis]:
    """A client of a loopback port where nothing listens."""
    settings = load_settings(CommonSettings, [f"--redis-url=redis://127.0.0.1:{free_port()}/0"])
    value = connect_limiter_redis(settings)
    yield value
    await value.aclose()


class CountingPipelines:
    """Wrap `client.pipeline` to count the pipelines that a batcher sends."""

    def __init__(self, client: redis.Redis) -> None:
        self.count = 0
        self._pipeline = client.pipeline
        client.pipeline = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self._pipeline(*args, **kwargs)


async def test_concurrent_calls_share_one_pipeline(client: redis.Redis, prefix: str) -> None:
    await client.mset({f"{prefix}{index}": f"value-{index}" for index in range(CALLERS)})
    pipelines = CountingPipelines(client)
    batcher = CommandBatcher(client, timeout=TIMEOUT)

    replies = await asyncio.gather(
        *(batcher.call("GET", f"{prefix}{index}") for index in range(CALLERS))
    )

    assert replies == [f"value-{index}" for index in range(CALLERS)]
    assert pipelines.count == 1


async def test_batch_split_at_max_batch(client: redis.Redis, prefix: str) -> None:
    await client.mset({f"{prefix}{index}": str(index) for index in range(10)})
    pipelines = CountingPipelines(client)
    batcher = CommandBatcher(client, timeout=TIMEOUT, max_batch=4)

    replies = await asyncio.gather(
        *(batcher.call("GET", f"{prefix}{index}") for index in range(10))
    )

    assert replies == [str(index) for index in range(10)]
    assert pipelines.count == 3


async def test_error_reply_reaches_only_its_caller(client: redis.Redis, prefix: str) -> None:
    await client.set(f"{prefix}text", "not a number")
    batcher = CommandBatcher(client, timeout=TIMEOUT)

    results = await asyncio.gather(
        batcher.call("INCR", f"{prefix}counter"),
        batcher.call("INCR", f"{prefix}text"),
        batcher.call("INCR", f"{prefix}counter"),
        return_exceptions=True,
    )

    assert results[0] == 1
    assert isinstance(results[1], ResponseError)
    assert "not an integer" in str(results[1])
    assert results[2] == 2


async def test_cancelled_caller_leaves_others_answered(client: redis.Redis, prefix: str) -> None:
    await client.mset({f"{prefix}a": "a", f"{prefix}b": "b"})
    batcher = CommandBatcher(client, timeout=TIMEOUT)

    first = asyncio.ensure_future(batcher.call("GET", f"{prefix}a"))
    second = asyncio.ensure_future(batcher.call("GET", f"{prefix}b"))
    await asyncio.sleep(0)
    first.cancel()

    assert await second == "b"
    assert first.cancelled()
    assert await batcher.call("GET", f"{prefix}a") == "a"


async def test_failed_pipeline_raises_to_every_caller(unreachable: redis.Redis) -> None:
    batcher = CommandBatcher(unreachable, timeout=TIMEOUT)

    results = await asyncio.wait_for(
        asyncio.gather(*(batcher.call("GET", "any") for _ in range(5)), return_exceptions=True),
        timeout=10,
    )

    assert len(results) == 5
    for result in results:
        assert isinstance(result, RedisConnectionError)


async def test_slow_pipeline_times_out_for_every_caller() -> None:
    # A loopback server that accepts connections and never replies, like a hung Redis.
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    hung = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    batcher = CommandBatcher(hung, timeout=0.2)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.call("GET", "any") for _ in range(3)), return_exceptions=True),
            timeout=10,
        )
    finally:
        await hung.aclose()
        silent.close()
        await silent.wait_closed()

    for result in results:
        assert isinstance(result, RedisTimeoutError)
        assert str(result) == "Redis did not reply to 3 commands within 0.2 s"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout must be above 0 seconds, got 0"),
        ({"timeout": float("nan")}, "timeout must be above 0 seconds, got nan"),
        ({"timeout": TIMEOUT, "max_batch": 0}, "max_batch must be at least 1, got 0"),
    ],
)
def test_batcher_options_rejected(
    client: redis.Redis, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CommandBatcher(client, **options)


async def test_script_loaded_after_noscript(client: redis.Redis, prefix: str) -> None:
    # A script text that Redis has never seen, so the first EVALSHA gets NOSCRIPT.
    source = f"-- {uuid.uuid4().hex}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    script = ScriptBatcher(CommandBatcher(client, timeout=TIMEOUT), source)

    first = await script.call([f"{prefix}n"], [5])
    second = await script.call([f"{prefix}n"], [2])

    assert first == 5
    assert second == 7
    assert await client.get(f"{prefix}n") == "7"


def _record(agent_id: str) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        state=AgentState.REQUESTED,
        image_url="https://registry.test/agent.tar",
        image_digest="sha256:" + "a" * 64,
        lifetime_seconds=60,
        correlation_id="test-batch",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


async def test_store_reads_records_and_misses(client: redis.Redis) -> None:
    known = _record(new_agent_id())
    key = store._record_key(known.agent_id)
    # Written directly, so the record stays out of the shared index of agents.
    await client.set(key, known.model_dump_json(), ex=60)
    try:
        agents = GatewayAgentStore(client, reads=client, read_timeout=TIMEOUT)
        found, missing = await asyncio.gather(
            agents.get(known.agent_id), agents.get(new_agent_id())
        )
    finally:
        await client.delete(key)

    assert found == known
    assert missing is None


async def test_store_read_failure_is_store_error(unreachable: redis.Redis) -> None:
    agent_id = new_agent_id()

    with pytest.raises(StoreError, match=f"cannot read agent '{agent_id}'"):
        await GatewayAgentStore(unreachable, reads=unreachable, read_timeout=TIMEOUT).get(agent_id)
