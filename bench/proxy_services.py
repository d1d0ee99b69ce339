"""Processes of the proxy benchmark: Redis, NATS, our proxy and Squid, each ended by its pid.

All of them run in the proxy namespace (see bench/proxy_net.py), so Redis and NATS listen on
that namespace's loopback at their usual ports and never meet the ones of scripts/deps.sh.
Squid comes from Debian's `squid` package. `ensure_squid` installs it when it is missing,
with a policy-rc.d that forbids starting services, and the benchmark runs its own `squid -N`
with its own configuration, pid file and logs in the run's folder.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from tests.support.stack import VENV_BIN

SQUID = Path("/usr/sbin/squid")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
# invoke-rc.d and deb-systemd-invoke start no service when policy-rc.d exits with 101.
POLICY_FORBIDS = 101
APT_TIMEOUT = 600
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REDIS_PORT = 6379
NATS_PORT = 4222
SQUID_PORT = 3128
EXPLICIT_PORT = 15080


class ServiceError(RuntimeError):
    """A process of the benchmark did not install, start or respond as expected."""


# Squid from Debian


def _squid_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "exe") == str(SQUID):
                    pids.add(int(entry.name))
    return pids


def ensure_squid() -> str:
    """Install Debian's squid package if it is missing; return `squid -v`'s first line.

    A policy-rc.d that exits with 101 keeps the package's own service from starting. An
    existing policy-rc.d is used only if it forbids starting squid; one written here is
    removed after the install. A squid process that still appears during the install is
    ended by its pid. Raises ServiceError when the install fails or cannot be made safe.
    """
    if not SQUID.exists():
        written = _forbid_service_starts()
        before = _squid_pids()
        try:
            _apt("update", "-q")
            _apt("install", "-y", "-q", "--no-install-recommends", "squid")
        finally:
            if written:
                POLICY_RC.unlink()
        for pid in _squid_pids() - before:
            print(f"warning: the squid package started squid (pid {pid}); ending it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    output = subprocess.run([str(SQUID), "-v"], capture_output=True, text=True, check=True)
    return output.stdout.splitlines()[0]


def _forbid_service_starts() -> bool:
    """Make sure policy-rc.d forbids starting squid; return whether it was written here."""
    if POLICY_RC.exists():
        status = subprocess.run([str(POLICY_RC), "squid", "start"], check=False).returncode
        if status != POLICY_FORBIDS:
            raise ServiceError(
                f"{POLICY_RC} exits with {status} for 'squid start', so installing squid "
                "would start its service; install squid yourself with its service "
                "disabled, then run the benchmark again"
            )
        return False
    POLICY_RC.write_text(
        "#!/bin/sh\n# Written by bench/proxy.py while it installs squid.\nexit 101\n"
    )
    POLICY_RC.chmod(0o755)
    return True


def _apt(*arguments: str) -> None:
    command = ["apt-get", *arguments]
    print(f"running {' '.join(command)}", flush=True)
    result = subprocess.run(
        command,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        text=True,
        timeout=APT_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise ServiceError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")


# Processes


@dataclass
class Service:
    """A started process, its log file, and how to stop it."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        """Raise ServiceError with the log's end when the process has exited."""
        status = self.process.poll()
        if status is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise ServiceError(f"{self.name} exited with status {status}:\n{tail}")

    def stop(self) -> None:
        """End the process by its pid: SIGTERM, then SIGKILL after STOP_TIMEOUT."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def running(
    name: str,
    command: list[str],
    *,
    log: Path,
    env: dict[str, str] | None = None,
    user: int | None = None,
) -> Iterator[Service]:
    """Start `command` with its output in `log`, as `user` if given; stop it on exit."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=output,
            env=env,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )
    service = Service(name=name, process=process, log=log)
    try:
        yield service
    finally:
        service.stop()


def wait_for_port(service: Service, address: str, port: int) -> None:
    """Wait until `address:port` accepts TCP connections while `service` runs."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        service.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
            return
        time.sleep(0.05)
    raise ServiceError(f"{service.name} did not listen on {address}:{port} in {START_TIMEOUT} s")


def wait_for_text(service: Service, text: str) -> None:
    """Wait until the service's log contains `text`."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        service.check_alive()
        if text in service.log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise ServiceError(f"{service.name} did not log {text!r} in {START_TIMEOUT} s")


@dataclass(frozen=True)
class Backends:
    """Redis and NATS of the run, with their generated passwords."""

    redis_password: str
    nats_password: str
    redis: Service
    nats: Service

    def env(self, host_id: str) -> dict[str, str]:
        """Return the environment of our proxy: this run's host id, Redis and NATS only."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("AGENT_")}
        env.update(
            AGENT_RUNNER_HOST_ID=host_id,
            AGENT_RUNNER_LOG_LEVEL="INFO",
            AGENT_RUNNER_NATS_URL=f"nats://127.0.0.1:{NATS_PORT}",
            AGENT_RUNNER_NATS_USER="bench",
            AGENT_RUNNER_NATS_PASSWORD=self.nats_password,
            AGENT_RUNNER_REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}/0",
            AGENT_RUNNER_REDIS_PASSWORD=self.redis_password,
        )
        return env


@contextlib.contextmanager
def running_backends(folder: Path) -> Iterator[Backends]:
    """Run redis-server and nats-server (JetStream) on the namespace's loopback."""
    redis_password, nats_password = secrets.token_hex(16), secrets.token_hex(16)
    redis_conf = folder / "redis.conf"
    redis_conf.write_text(
        f"bind 127.0.0.1\nport {REDIS_PORT}\nprotected-mode yes\n"
        f"requirepass {redis_password}\ndaemonize no\n"
        f'dir "{folder}"\nsave ""\nappendonly no\nlogfile ""\n'
    )
    nats_conf = folder / "nats.conf"
    nats_conf.write_text(
        f'listen: "127.0.0.1:{NATS_PORT}"\n'
        f'jetstream {{ store_dir: "{folder / "nats"}" }}\n'
        f'authorization {{ user: "bench", password: "{nats_password}" }}\n'
    )
    for conf in (redis_conf, nats_conf):
        conf.chmod(0o600)
    with (
        running(
            "redis-server", ["redis-server", str(redis_conf)], log=folder / "redis.log"
        ) as redis_server,
        running(
            "nats-server", ["nats-server", "-c", str(nats_conf)], log=folder / "nats.log"
        ) as nats_server,
    ):
        wait_for_port(redis_server, "127.0.0.1", REDIS_PORT)
        wait_for_port(nats_server, "127.0.0.1", NATS_PORT)
        yield Backends(
            redis_password=redis_password,
            nats_password=nats_password,
            redis=redis_server,
            nats=nats_server,
        )


def owned_folder(parent: Path, name: str, uid: int) -> Path:
    """Create `parent/name` owned by `uid`, private to it."""
    folder = parent / name
    folder.mkdir(mode=0o700)
    os.chown(folder, uid, uid)
    return folder


@contextlib.contextmanager
def running_our_proxy(
    folder: Path,
    backends: Backends,
    *,
    host_id: str,
    uid: int,
    dns_server: IPv4Address,
    subnet: IPv4Network,
    gateway: IPv4Address,
) -> Iterator[Service]:
    """Run agent-runner-proxy as `uid` on `gateway`, resolving through `dns_server`.

    The per-agent request and byte limits are raised far above what the benchmark sends,
    because it sends thousands of requests from one agent. The limiter still counts each
    request in Redis.
    """
    confdir = owned_folder(folder, "proxy-conf", uid)
    command = [
        str(VENV_BIN / "agent-runner-proxy"),
        f"--sandbox-subnet={subnet}",
        f"--sandbox-gateway={gateway}",
        f"--proxy-explicit-port={EXPLICIT_PORT}",
        f"--upstream-dns={dns_server}",
        f"--confdir={confdir}",
        "--max-requests-per-window=1000000000",
        "--max-bytes-per-window=1000000000000",
        "--listen-wait=10",
    ]
    with running(
        "agent-runner-proxy", command, log=folder / "proxy.log", env=backends.env(host_id), user=uid
    ) as proxy:
        wait_for_text(proxy, f"proxy {host_id} started")
        yield proxy


def squid_config(folder: Path, *, gateway: IPv4Address, dns_server: IPv4Address) -> str:
    """Return a squid.conf with the same allowlist and ports as our proxy's agent policy.

    `.allowed.test` matches allowed.test and every name below it, like our proxy's pair
    `allowed.test, *.allowed.test`. Squid 5.7 rejects listing `allowed.test` next to it
    ("is a subdomain of").
    """
    return f"""\
http_port {gateway}:{SQUID_PORT}
acl allowed dstdomain .allowed.test
acl allowed_ports port 80 443
http_access deny !allowed_ports
http_access allow allowed
http_access deny all
dns_nameservers {dns_server}
hosts_file none
cache deny all
cache_mem 8 MB
pid_filename {folder}/squid.pid
cache_log {folder}/cache.log
access_log stdio:{folder}/access.log squid
coredump_dir {folder}
netdb_filename none
pinger_enable off
shutdown_lifetime 0 seconds
visible_hostname squid.bench.test
max_filedescriptors 4096
"""


@contextlib.contextmanager
def running_squid(
    folder: Path, *, uid: int, gateway: IPv4Address, dns_server: IPv4Address
) -> Iterator[Service]:
    """Run `squid -N` (one process, no kids) as `uid` with its files in `folder`/squid."""
    own = owned_folder(folder, "squid", uid)
    conf = own / "squid.conf"
    conf.write_text(squid_config(own, gateway=gateway, dns_server=dns_server))
    check = subprocess.run(
        [str(SQUID), "-k", "parse", "-f", str(conf)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise ServiceError(f"squid rejects {conf}: {check.stderr[-2000:]}")
    command = [str(SQUID), "-N", "-f", str(conf)]
    with running("squid", command, log=own / "squid.out", user=uid) as squid:
        wait_for_port(squid, str(gateway), SQUID_PORT)
        yield squid


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user and system) that process `pid` has used, in seconds.

    The kernel counts it in clock ticks, 10 ms each on most systems.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of proc(5); fields[0] is field 3, the state.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def access_log_count(folder: Path, text: str) -> int:
    """Return how many lines of Squid's access log contain `text`."""
    log = folder / "squid" / "access.log"
    return sum(1 for line in log.read_text().splitlines() if text in line)
