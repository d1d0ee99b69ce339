"""Run the real gateway and supervisor as subprocesses for integration tests and benchmarks.

Each stack runs its own nats-server with JetStream on a free loopback port, so stacks of
concurrent test runs never take each other's requests from the shared `supervisor` queue
group. Redis comes from the environment that scripts/deps.sh writes (var/agent-runner.env);
records are keyed by random agent ids, so stacks can share it. Each stack uses its own host
id, cache folder, key file and sandbox network, so its containers are easy to find and
remove, and every process it starts is ended by pid.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import redis

REPO_ROOT = Path(__file__).resolve().parents[2]
# The proxy runs under its own user id in tests, so an nftables rule can confine where it
# connects. No account with this id needs to exist.
PROXY_UID = 64_321
# Where the proxy under test may send packets besides loopback and the sandbox subnet: the
# fake hosts of tests/support (documentation networks and one link-local test address).
PROXY_ALLOWED_V4 = ("198.51.100.0/24", "203.0.113.0/24", "169.254.42.42")
PROXY_ALLOWED_V6 = ("2001:db8:100::/64",)
VENV_BIN = REPO_ROOT / ".venv" / "bin"
HOST_LABEL = "io.agent-runner.host-id"
# OCI runtime of every stack's agents: runc, or runsc for the second pass of scripts/test.sh.
TEST_RUNTIME_VARIABLE = "AGENT_RUNNER_TEST_RUNTIME"


def agent_runtime() -> str:
    """Return the agents' runtime chosen by AGENT_RUNNER_TEST_RUNTIME (default runc)."""
    runtime = os.environ.get(TEST_RUNTIME_VARIABLE, "runc")
    if runtime not in ("runc", "runsc"):
        raise ValueError(f"{TEST_RUNTIME_VARIABLE}={runtime!r} is invalid; expected runc or runsc")
    return runtime


def runtime_args() -> list[str]:
    """Return the supervisor flags for the test runtime.

    Production stacks under runc must turn --require-gvisor off, because the production
    profile requires gVisor. Under runsc the profile's default stays, so production stacks
    also check that the startup probe passes.
    """
    if agent_runtime() == "runsc":
        return ["--runtime=runsc"]
    return ["--runtime=runc", "--no-require-gvisor"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class FileServer:
    """Serve a folder over HTTP on 127.0.0.1 from a thread."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.directory = directory
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        """Return the URL of file `name` in the served folder."""
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Stack:
    """A gateway and a supervisor started for one test session."""

    workdir: Path
    supervisor_args: list[str] = field(default_factory=list)
    api_args: list[str] = field(default_factory=list)
    profile: str = "development"
    host_id: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:8]}")
    api_port: int = field(default_factory=free_port)
    nats_port: int = field(default_factory=free_port)
    nats_password: str = field(default_factory=lambda: uuid.uuid4().hex)
    network: str = "agent-runner-test"
    subnet: str = "172.29.0.0/24"
    bridge: str = "ar-test0"
    netguard: bool = True
    netguard_args: list[str] = field(default_factory=list)
    proxy: bool = False
    proxy_args: list[str] = field(default_factory=list)
    api_key: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _confdirs: list[Path] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        """Base URL of the gateway."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def headers(self) -> dict[str, str]:
        """Headers that authenticate as the stack's key."""
        return {"X-API-Key": self.api_key}

    def env(self) -> dict[str, str]:
        """Return the environment of the services."""
        env = dict(os.environ)
        env.update(
            AGENT_RUNNER_PROFILE=self.profile,
            AGENT_RUNNER_HOST_ID=self.host_id,
            AGENT_RUNNER_LOG_LEVEL="INFO",
            AGENT_RUNNER_NATS_URL=f"nats://127.0.0.1:{self.nats_port}",
            AGENT_RUNNER_NATS_USER="tests",
            AGENT_RUNNER_NATS_PASSWORD=self.nats_password,
        )
        return env

    def start(self) -> None:
        """Create the key and start both services; wait until the gateway responds."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        key_file = self.workdir / "api-keys"
        key_file.unlink(missing_ok=True)
        self.api_key = subprocess.run(
            [VENV_BIN / "agent-runner", "keys", "create", "--file", key_file, "--id", "tests"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.start_nats()
        if self.netguard:
            self.start_netguard()
        self.start_supervisor()
        if self.proxy:
            self.start_proxy()
        self.start_api()

    @property
    def firewall_table(self) -> str:
        """Name of this stack's nftables tables, unique like the host id."""
        return "ar_" + self.host_id.replace("-", "_")

    def start_netguard(self, extra: list[str] | None = None) -> None:
        """Start netguard for this stack's bridge and wait until it applied its tables."""
        offset = self._log("netguard").stat().st_size if self._log("netguard").exists() else 0
        self._spawn(
            "netguard",
            "agent-runner-netguard",
            [
                f"--firewall-table={self.firewall_table}",
                f"--sandbox-subnet={self.subnet}",
                f"--sandbox-bridge={self.bridge}",
                "--firewall-check-interval=1",
                "--metrics-port=0",
                *self.netguard_args,
                *(extra or []),
            ],
        )
        self._wait_for_log("netguard", "started", timeout=30, offset=offset)

    @property
    def confinement_table(self) -> str:
        """Name of the nftables table that confines the proxy's own outbound traffic."""
        return self.firewall_table + "_out"

    def start_proxy(self, extra: list[str] | None = None) -> None:
        """Start the proxy as PROXY_UID, confined to the fake hosts, and wait until it listens.

        An `output` rule drops every packet the proxy's user sends anywhere but loopback, the
        sandbox subnet and the fake hosts' documentation and test addresses, so a proxy bug
        cannot send a request off this machine.
        """
        confine_proxy(self.confinement_table, uid=PROXY_UID, sandbox_subnet=self.subnet)
        confdir = Path(tempfile.mkdtemp(prefix=f"proxy-{self.host_id}-"))
        os.chown(confdir, PROXY_UID, PROXY_UID)
        self._confdirs.append(confdir)
        offset = self._log("proxy").stat().st_size if self._log("proxy").exists() else 0
        self._spawn(
            "proxy",
            "agent-runner-proxy",
            [
                f"--sandbox-subnet={self.subnet}",
                f"--confdir={confdir}",
                *self.proxy_args,
                *(extra or []),
            ],
            user=PROXY_UID,
        )
        self._wait_for_log("proxy", "started", timeout=30, offset=offset)

    def start_nats(self) -> None:
        """Start this stack's nats-server with JetStream and wait until it accepts clients."""
        config = self.workdir / "nats.conf"
        config.write_text(
            f'listen: "127.0.0.1:{self.nats_port}"\n'
            f'jetstream {{ store_dir: "{self.workdir / "nats"}" }}\n'
            f'authorization {{ user: "tests", password: "{self.nats_password}" }}\n'
        )
        log = self._log("nats").open("ab")
        self.processes["nats"] = subprocess.Popen(
            ["nats-server", "-c", str(config)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self._check_alive("nats")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.nats_port), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen within 20 s; see {self._log('nats')}")

    def start_supervisor(self, extra: list[str] | None = None) -> None:
        """Start the supervisor and wait until it subscribed."""
        args = [
            f"--cache-dir={self.workdir / 'cache'}",
            f"--sandbox-network={self.network}",
            f"--sandbox-subnet={self.subnet}",
            f"--sandbox-bridge={self.bridge}",
            "--metrics-port=0",
            *runtime_args(),
            *self.supervisor_args,
            *(extra or []),
        ]
        offset = self._log("supervisor").stat().st_size if self._log("supervisor").exists() else 0
        self._spawn("supervisor", "agent-runner-supervisor", args)
        self._wait_for_log("supervisor", "started", timeout=60, offset=offset)
        if "netguard" in self.processes:
            # Agents start only once the supervisor has seen netguard's verified state.
            self._wait_for_text("supervisor", "firewall state of", timeout=20, offset=offset)

    def start_api(self) -> None:
        """Start the gateway and wait until /healthz responds."""
        self._spawn(
            "api",
            "agent-runner-api",
            [
                f"--listen-port={self.api_port}",
                f"--api-keys-file={self.workdir / 'api-keys'}",
                f"--rate-limit-key-prefix={self.rate_limit_prefix}",
                *self.api_args,
            ],
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._check_alive("api")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not answer within 30 s; see {self._log('api')}")

    @property
    def rate_limit_prefix(self) -> str:
        """Prefix of this stack's rate-limit keys in the shared Redis.

        Every stack's clients connect from 127.0.0.1, so stacks with a shared prefix would
        draw from one bucket.
        """
        return f"agent-runner:api:rate:{self.host_id}:"

    def stop_service(self, name: str, *, sig: int = signal.SIGTERM) -> int:
        """Send `sig` to a service, wait for it and return its exit status."""
        process = self.processes.pop(name)
        process.send_signal(sig)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout=10)

    def close(self) -> None:
        """Stop every service and remove every container and the network of this stack."""
        for name in ("api", "proxy", "supervisor", "netguard", "nats"):
            if name in self.processes:
                self.stop_service(name)
        subprocess.run(
            ["nft", "delete", "table", "inet", self.confinement_table],
            capture_output=True,
            check=False,
        )
        for confdir in self._confdirs:
            shutil.rmtree(confdir, ignore_errors=True)
        for family in ("inet", "bridge"):
            subprocess.run(
                ["nft", "delete", "table", family, self.firewall_table],
                capture_output=True,
                check=False,
            )
        self._forget_cache_state()
        client = docker.from_env()
        try:
            for container in client.containers.list(
                all=True, filters={"label": f"{HOST_LABEL}={self.host_id}"}
            ):
                container.remove(force=True, v=True)
            for network in client.networks.list(names=[self.network]):
                if network.name == self.network:
                    network.remove()
        finally:
            client.close()

    def _forget_cache_state(self) -> None:
        """Delete this host's image-cache and rate-limit keys from the shared Redis."""
        url = self.env().get("AGENT_RUNNER_REDIS_URL")
        if url is None:
            return
        client = redis.Redis.from_url(url, password=self.env().get("AGENT_RUNNER_REDIS_PASSWORD"))
        try:
            keys = list(client.scan_iter(f"agent-runner:cache:{self.host_id}:*"))
            keys += list(client.scan_iter(f"{self.rate_limit_prefix}*"))
            if keys:
                client.delete(*keys)
            client.srem("agent-runner:cache-hosts", self.host_id)
        finally:
            client.close()

    def audit_events(self, agent_id: str | None = None) -> list[dict[str, Any]]:
        """Return the events in this stack's audit stream, of one agent when given."""
        command = [str(VENV_BIN / "agent-runner"), "audit", "events"]
        if agent_id is not None:
            command += ["--agent-id", agent_id]
        output = subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=60, env=self.env()
        ).stdout
        return [json.loads(line) for line in output.splitlines()]

    def log_text(self, name: str) -> str:
        """Return what a service has logged so far."""
        return self._log(name).read_text(errors="replace")

    def _log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _spawn(self, name: str, command: str, args: list[str], *, user: int | None = None) -> None:
        log = self._log(name).open("ab")
        self.processes[name] = subprocess.Popen(
            [VENV_BIN / command, *args],
            env=self.env(),
            stdout=log,
            stderr=log,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )

    def _check_alive(self, name: str) -> None:
        status = self.processes[name].poll()
        if status is not None:
            raise RuntimeError(
                f"{name} exited with status {status}:\n{self.log_text(name)[-3000:]}"
            )

    def _wait_for_log(self, name: str, text: str, *, timeout: float, offset: int = 0) -> None:
        self._wait_for_text(name, f"{name} {self.host_id} {text}", timeout=timeout, offset=offset)

    def _wait_for_text(self, name: str, marker: str, *, timeout: float, offset: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(name)
            if marker in self.log_text(name)[offset:]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not log {marker!r} within {timeout:g} s")


@contextlib.contextmanager
def running_stack(workdir: Path, **options: Any) -> Iterator[Stack]:
    """Start a stack and always clean it up."""
    stack = Stack(workdir=workdir, **options)
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


def wait_for_state(
    client: httpx.Client, agent_id: str, states: set[str], *, timeout: float
) -> dict[str, Any]:
    """Poll GET /v1/agents/{id} until its state is one of `states`; return the agent."""
    deadline = time.monotonic() + timeout
    while True:
        agent: dict[str, Any] = client.get(f"/v1/agents/{agent_id}").json()
        if agent.get("state") in states:
            return agent
        if time.monotonic() > deadline:
            raise AssertionError(f"agent {agent_id} stayed {agent.get('state')!r}: {agent}")
        time.sleep(0.1)


def confine_proxy(table: str, *, uid: int, sandbox_subnet: str) -> None:
    """Create table `table` whose output chain drops the proxy's packets to foreign addresses."""
    v4 = ", ".join(("127.0.0.0/8", sandbox_subnet, *PROXY_ALLOWED_V4))
    v6 = ", ".join(("::1", *PROXY_ALLOWED_V6))
    ruleset = (
        f"table inet {table} {{\n"
        "  chain output {\n"
        "    type filter hook output priority -20; policy accept;\n"
        f"    meta skuid {uid} meta nfproto ipv4 ip daddr != {{ {v4} }} counter drop\n"
        f"    meta skuid {uid} meta nfproto ipv6 ip6 daddr != {{ {v6} }} counter drop\n"
        "  }\n"
        "}\n"
    )
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
    subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True, capture_output=True)
