"""Send the gateway's per-request Redis commands in pipelines, one pipeline per event-loop turn.

Every gateway request runs the rate-limit script (services/api/ratelimit.py), and most routes
read an agent record. Sent one at a time through redis-py, each command costs a connection
checkout, a write and a read, and these were the largest costs of a gateway request
(docs/benchmarks.md). `CommandBatcher` collects the commands that requests send during one
turn of the event loop and sends them as one pipeline without MULTI. Redis still runs each
command, and each script call, atomically on its own, and the replies come back in the order
of the commands, so every caller gets the reply to its own command.

A batcher bounds each pipeline as a whole with its `timeout`. Its client should have no
`socket_timeout`, because redis-py then sets up a timer for each reply it reads, which cost
more than reading the reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

# Maximum commands in one pipeline. A busier turn of the event loop starts a second pipeline.
MAX_BATCH = 256


@dataclass(frozen=True)
class _Command:
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


class CommandBatcher:
    """Send the commands of one event-loop turn to Redis in one pipeline.

    `call` raises the RedisError or OSError of a failed pipeline to every caller in it, and a
    command's error reply (a ResponseError) only to the caller whose command failed. A
    pipeline that takes longer than `timeout` seconds fails with a redis TimeoutError.
    """

    def __init__(self, client: redis.Redis, *, timeout: float, max_batch: int = MAX_BATCH) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be above 0 seconds, got {timeout!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch!r}")
        self._client = client
        self._timeout = timeout
        self._max_batch = max_batch
        self._collecting: list[_Command] | None = None
        # The event loop keeps only weak references to tasks.
        self._sending: set[asyncio.Task[None]] = set()

    async def call(self, *args: Any) -> Any:
        """Send the command `args`, such as ("GET", key), and return its reply."""
        loop = asyncio.get_running_loop()
        if self._collecting is None or len(self._collecting) >= self._max_batch:
            self._collecting = []
            # The task's first step runs after the callbacks that are ready now, so the
            # commands that other requests send in this turn join the batch before it goes.
            task = loop.create_task(self._send(self._collecting))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        future: asyncio.Future[Any] = loop.create_future()
        self._collecting.append(_Command(args, future))
        return await future

    async def _send(self, batch: list[_Command]) -> None:
        if self._collecting is batch:
            self._collecting = None
        # A caller that was cancelled while waiting, such as a request whose client went
        # away, needs no reply.
        commands = [command for command in batch if not command.future.done()]
        if not commands:
            return
        pipeline = self._client.pipeline(transaction=False)
        for command in commands:
            pipeline.execute_command(*command.args)
        try:
            # On timeout, redis-py drops the connection whose replies are still unread.
            async with asyncio.timeout(self._timeout):
                replies = await pipeline.execute(raise_on_error=False)
        except TimeoutError as exc:
            error = RedisTimeoutError(
                f"Redis did not reply to {len(commands)} commands within {self._timeout} s"
            )
            error.__cause__ = exc
            self._fail(commands, error)
            return
        except asyncio.CancelledError:
            for command in commands:
                command.future.cancel()
            raise
        except Exception as exc:
            # Every caller must get an outcome, or its request would wait forever.
            self._fail(commands, exc)
            return
        for command, reply in zip(commands, replies, strict=True):
            if command.future.done():
                continue
            if isinstance(reply, Exception):
                command.future.set_exception(reply)
            else:
                command.future.set_result(reply)

    @staticmethod
    def _fail(commands: Sequence[_Command], error: BaseException) -> None:
        for command in commands:
            if not command.future.done():
                command.future.set_exception(error)


class ScriptBatcher:
    """Call one Lua script through a CommandBatcher, by its SHA-1 with EVALSHA.

    A NOSCRIPT reply, after a Redis restart or SCRIPT FLUSH, loads the script and sends the
    call once more. Other errors are raised as CommandBatcher raises them.
    """

    def __init__(self, commands: CommandBatcher, script: str) -> None:
        self._commands = commands
        self._script = script
        # Redis names a script by the SHA-1 of its text; this is not a security use of SHA-1.
        self._sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()

    async def call(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the script with `keys` and `args` and return its reply."""
        try:
            return await self._commands.call("EVALSHA", self._sha, len(keys), *keys, *args)
        except NoScriptError:
            logger.info("script %s not in Redis (restarted or flushed); loading it", self._sha)
        await self._commands.call("SCRIPT", "LOAD", self._script)
        return await self._commands.call("EVALSHA", self._sha, len(keys), *keys, *args)
