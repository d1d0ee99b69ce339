"""A private redis-server for tests that must not share the deployment's Redis."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import redis

from tests.support.stack import free_port


class RedisServer:
    """A redis-server of one test or module on a free loopback port, without persistence.

    Tests that stop Redis or need an empty store use one, so they never touch the shared server
    from scripts/deps.sh. The process is stopped by its pid.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = uuid.uuid4().hex
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def flags(self) -> list[str]:
        """Service flags that put the agent store and rate limits on this server."""
        return [f"--redis-url=redis://127.0.0.1:{self.port}/0", f"--redis-password={self.password}"]

    def start(self) -> None:
        """Start the server and wait until it answers PING; raise RuntimeError if it does not."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--requirepass",
                    self.password,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=log,
                stderr=log,
            )

        client = redis.Redis(port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.1)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(
            f"redis-server on port {self.port} did not respond within 10 s. "
            f"See {self.workdir / 'redis.log'}"
        )

    def stop(self) -> None:
        """Stop the server if it runs."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
