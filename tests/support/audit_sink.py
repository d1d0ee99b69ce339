"""A private nats-server and the audit sink as subprocesses, for integration tests and the bench.

Each NatsServer listens on its own free loopback port with its own JetStream folder, so the
AUDIT stream of one test never mixes with the shared deployment's or another test's. Every
process is ended by its pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from tests.support.stack import VENV_BIN, free_port


class NatsServer:
    """nats-server with JetStream on 127.0.0.1, with a user and password."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = uuid.uuid4().hex
        config = workdir / "nats.conf"
        config.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{ store_dir: "{workdir / "jetstream"}" }}\n'
            f'authorization {{ user: "tests", password: "{self.password}" }}\n'
        )
        log = (workdir / "nats.log").open("ab")
        self.process = subprocess.Popen(["nats-server", "-c", str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited; see {workdir / 'nats.log'}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nats-server did not listen within 20 s")

    @property
    def url(self) -> str:
        """URL of the server."""
        return f"nats://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Return an environment whose AGENT_RUNNER_* settings point at this server."""
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("AGENT_RUNNER_")
        }
        env.update(
            AGENT_RUNNER_HOST_ID="audit-test",
            AGENT_RUNNER_NATS_URL=self.url,
            AGENT_RUNNER_NATS_USER="tests",
            AGENT_RUNNER_NATS_PASSWORD=self.password,
        )
        return env

    def stop(self) -> None:
        """End the server and wait for it."""
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class AuditSinkProcess:
    """`agent-runner-audit` writing to `audit_dir`, started and stopped on request."""

    def __init__(self, nats: NatsServer, audit_dir: Path, key: Path, *args: str) -> None:
        self.nats = nats
        self.audit_dir = audit_dir
        self.key = key
        self.args = list(args)
        self.log = nats.workdir / "audit.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30) -> None:
        """Start the sink and wait until it logs that it consumes."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        log = self.log.open("ab")
        self.process = subprocess.Popen(
            [
                VENV_BIN / "agent-runner-audit",
                f"--audit-dir={self.audit_dir}",
                f"--audit-signing-key={self.key}",
                *self.args,
            ],
            env=self.nats.env(),
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"audit sink exited:\n{self.log.read_text()[offset:][-3000:]}")
            if "audit audit-test started" in self.log.read_text()[offset:]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"audit sink did not start within {timeout} s; see {self.log}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig`, wait for the sink to exit and return its status."""
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)
        finally:
            self.process = None


def create_signing_key(path: Path) -> Path:
    """Create a signing key with `agent-runner audit keygen`; return its .pub file."""
    output = subprocess.run(
        [VENV_BIN / "agent-runner", "audit", "keygen", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(output.rsplit("verification key: ", 1)[1].strip())
