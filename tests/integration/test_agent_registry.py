"""AgentRegistry against the real Redis that scripts/deps.sh started.

Each test uses a fresh host id, so its hash cannot collide with another run's, and deletes the hash
afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as redis

from libs.common.errors import StoreError
from libs.common.messages import AgentNetworkPolicy
from libs.common.registry import AgentRegistry
from libs.common.settings import CommonSettings, load_settings
from libs.common.store import connect_redis
from tests.support.stack import free_port

pytestmark = pytest.mark.integration

AGENT_ID = "ag-" + "0123456789abcdef" * 2
ADDRESS = "172.29.9.2"


@dataclass
class Registered:
    """A registry on a fresh host id, with the raw client and key to inspect it."""

    registry: AgentRegistry
    client: redis.Redis
    key: str


@pytest.fixture
async def registered() -> AsyncIterator[Registered]:
    client = connect_redis(load_settings(CommonSettings, []))
    host_id = f"test-{uuid.uuid4().hex[:8]}"
    key = f"agent-runner:netguard:{host_id}:agents"
    try:
        yield Registered(AgentRegistry(client, host_id=host_id), client, key)
    finally:
        await client.delete(key)
        await client.aclose()


async def test_get_returns_stored_policy(registered: Registered) -> None:
    policy = AgentNetworkPolicy(
        agent_id=AGENT_ID, address=ADDRESS, allowed_domains=["example.test", "*.example.test"]
    )
    await registered.registry.put(policy)

    assert await registered.registry.get(ADDRESS) == policy
    assert await registered.client.hget(registered.key, ADDRESS) == policy.model_dump_json()


async def test_get_absent_address_is_none(registered: Registered) -> None:
    await registered.registry.put(AgentNetworkPolicy(agent_id=AGENT_ID, address=ADDRESS))

    assert await registered.registry.get("172.29.9.3") is None


async def test_get_after_delete_is_none(registered: Registered) -> None:
    await registered.registry.put(AgentNetworkPolicy(agent_id=AGENT_ID, address=ADDRESS))
    await registered.registry.delete(ADDRESS)

    assert await registered.registry.get(ADDRESS) is None
    assert await registered.client.exists(registered.key) == 0


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param("[]", id="not-an-object"),
        pytest.param(f'{{"agent_id": "{AGENT_ID}"}}', id="missing-address"),
        pytest.param(
            f'{{"agent_id": "{AGENT_ID}", "address": "{ADDRESS}", "allowed_domains": ["A.test"]}}',
            id="upper-case-domain",
        ),
        pytest.param(
            f'{{"agent_id": "{AGENT_ID}", "address": "{ADDRESS}", "allow_all": true}}',
            id="unknown-field",
        ),
    ],
)
async def test_get_invalid_stored_value_raises(registered: Registered, stored: str) -> None:
    await registered.client.hset(registered.key, ADDRESS, stored)

    with pytest.raises(StoreError) as error:
        await registered.registry.get(ADDRESS)

    assert repr(ADDRESS) in str(error.value)
    assert "is invalid" in str(error.value)


async def test_get_policy_of_other_address_raises(registered: Registered) -> None:
    other = AgentNetworkPolicy(agent_id=AGENT_ID, address="172.29.9.3", allowed_domains=["x.test"])
    await registered.client.hset(registered.key, ADDRESS, other.model_dump_json())

    with pytest.raises(StoreError) as error:
        await registered.registry.get(ADDRESS)

    assert "'172.29.9.3'" in str(error.value)


async def test_get_without_redis_raises() -> None:
    # Nothing listens on a port that was free a moment ago, so the connection is refused.
    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=2)
    try:
        with pytest.raises(StoreError) as error:
            await AgentRegistry(client, host_id="unreachable").get(ADDRESS)
    finally:
        await client.aclose()

    assert "cannot read policy of '172.29.9.2'" in str(error.value)
