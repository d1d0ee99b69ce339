"""Network policies of one host's agents, kept in Redis by netguard and read by the proxy.

Netguard writes a policy when the supervisor registers an agent and deletes it when the agent
is removed, so a restarted netguard lets the same agents through again. The egress proxy
reads the policy of the sandbox address a connection comes from. Key
`agent-runner:netguard:<host>:agents` is a hash from sandbox address to the agent's
AgentNetworkPolicy as JSON.
"""

from __future__ import annotations

import redis.asyncio as redis
from pydantic import ValidationError
from redis.exceptions import RedisError

from libs.common.errors import StoreError
from libs.common.messages import AgentNetworkPolicy


class AgentRegistry:
    """Addresses and policies of the agents netguard lets reach the proxy."""

    def __init__(self, client: redis.Redis, *, host_id: str) -> None:
        self._redis = client
        self._key = f"agent-runner:netguard:{host_id}:agents"

    async def put(self, policy: AgentNetworkPolicy) -> None:
        """Store or replace the policy of `policy.address`."""
        try:
            await self._redis.hset(self._key, policy.address, policy.model_dump_json())
        except RedisError as exc:
            raise StoreError(f"cannot store policy of {policy.agent_id!r}: {exc}") from exc

    async def delete(self, address: str) -> None:
        """Forget `address`."""
        try:
            await self._redis.hdel(self._key, address)
        except RedisError as exc:
            raise StoreError(f"cannot delete policy of {address!r}: {exc}") from exc

    async def get(self, address: str) -> AgentNetworkPolicy | None:
        """Return the policy of sandbox address `address`, or None if none is registered.

        Raises StoreError when Redis fails, or when the stored value does not validate or
        names another address, so that a caller deciding on egress can deny.
        """
        try:
            raw = await self._redis.hget(self._key, address)
        except RedisError as exc:
            raise StoreError(f"cannot read policy of {address!r}: {exc}") from exc
        if raw is None:
            return None
        try:
            policy = AgentNetworkPolicy.model_validate_json(raw)
        except ValidationError as exc:
            raise StoreError(f"policy of {address!r} in {self._key!r} is invalid: {exc}") from exc
        # A value filed under another agent's address would hand that agent's allowlist over.
        if policy.address != address:
            raise StoreError(
                f"policy of {address!r} in {self._key!r} is invalid: "
                f"it is for address {policy.address!r}"
            )
        return policy

    async def all(self) -> list[AgentNetworkPolicy]:
        """Return every stored policy; raises StoreError if one does not validate."""
        try:
            raw = await self._redis.hgetall(self._key)
        except RedisError as exc:
            raise StoreError(f"cannot read agent policies: {exc}") from exc
        try:
            return [AgentNetworkPolicy.model_validate_json(value) for value in raw.values()]
        except ValidationError as exc:
            raise StoreError(f"an agent policy in {self._key!r} is invalid: {exc}") from exc
