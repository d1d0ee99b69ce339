"""Traffic for bench/firewall.py: busybox clients in the agent and a TCP sink on the host.

The sink listens where the proxy would, on the sandbox gateway address. One thread per
listening port serves one connection at a time, which suits clients that connect one after
another. A connection whose first byte is `p` carries a request: the sink reads it up to the
newline, sends a 5-byte response and closes. Any other connection is a stream: the sink counts
its bytes until the client shuts down its side. Every connection is recorded with the
listening port, its original destination, its accept and close times and the bytes received,
so the benchmark can time it on the host and check which path it took.

The clients are busybox `dd` and `nc` run with `docker exec` in the agent's container, as the
agent's own user. busybox `date` has no sub-second resolution, so all times come from the sink.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address

# getsockopt(SOL_IP, SO_ORIGINAL_DST) returns the destination before a NAT redirect, as a
# struct sockaddr_in; the value 80 comes from <linux/netfilter_ipv4.h>.
SO_ORIGINAL_DST = 80
# A client that sends nothing for this long is dropped, so a stuck client cannot hold the sink.
IDLE_TIMEOUT_SECONDS = 10
ACCEPT_POLL_SECONDS = 0.2
REQUEST_MAX_BYTES = 64
RESPONSE = b"pong\n"
BUFFER_BYTES = 1 << 20
# nc's connect timeout inside the agent; a dropped SYN would otherwise wait for TCP's retries.
CONNECT_TIMEOUT_SECONDS = 3
# Seconds the sink may take to record the last connection after the client has exited.
RECORD_TIMEOUT_SECONDS = 5.0

STREAM_SCRIPT = "dd if=/dev/zero bs=1000000 count={megabytes} 2>/dev/null | nc {host} {port}"
CONNECT_SCRIPT = """printf 'ping\\n' > /tmp/firewall-bench-request
i=0
while [ $i -lt {count} ]; do
  nc -w {connect_timeout} {host} {port} < /tmp/firewall-bench-request > /dev/null || exit 1
  i=$((i + 1))
done"""


@dataclass(frozen=True)
class Connection:
    """One served connection; times are `time.perf_counter()` seconds."""

    listener: int
    original: tuple[str, int] | None
    accepted: float
    closed: float
    received: int
    answered: bool


@dataclass(frozen=True)
class Route:
    """Destination of a client's connections, and the sink listener that must receive them."""

    host: IPv4Address
    port: int
    listener: int

    def check(self, connections: list[Connection]) -> None:
        """Raise RuntimeError unless every connection arrived at `listener` from this route.

        A redirected connection must show this route's host and port as its original
        destination. A direct one may show none, when conntrack keeps no entry for it.
        """
        redirected = self.port != self.listener
        expected = (str(self.host), self.port)
        for connection in connections:
            unknown_ok = connection.original is None and not redirected
            if connection.listener != self.listener or not (
                connection.original == expected or unknown_ok
            ):
                raise RuntimeError(
                    f"a connection to {self.host}:{self.port} arrived at listener "
                    f"{connection.listener} with original destination {connection.original}, "
                    f"expected listener {self.listener} and {expected}"
                )


class Sink:
    """Listen on `address` at `ports` and record every connection until closed."""

    def __init__(self, address: IPv4Address, ports: list[int]) -> None:
        self._records: list[Connection] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        try:
            for port in ports:
                self._listeners.append(_listen(address, port))
        except OSError:
            self.close()
            raise
        for listener in self._listeners:
            thread = threading.Thread(target=self._serve, args=(listener,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def take(self) -> list[Connection]:
        """Return the recorded connections in the order they closed, and forget them."""
        with self._lock:
            records, self._records = self._records, []
        return records

    def wait_for(self, count: int) -> list[Connection]:
        """Return the records once `count` connections have closed; raises RuntimeError.

        The client may exit a moment before the sink records its last connection.
        """
        deadline = time.monotonic() + RECORD_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._records) >= count:
                    break
            time.sleep(0.01)
        records = self.take()
        if len(records) != count:
            raise RuntimeError(f"the sink recorded {len(records)} connections, expected {count}")
        return records

    def close(self) -> None:
        """Stop serving and close the listening sockets."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=IDLE_TIMEOUT_SECONDS + 1)
        for listener in self._listeners:
            listener.close()

    def _serve(self, listener: socket.socket) -> None:
        port = int(listener.getsockname()[1])
        buffer = bytearray(BUFFER_BYTES)
        while not self._stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                # For example ECONNABORTED when a client resets before the accept; the
                # benchmark notices the missing record.
                print(f"warning: sink on port {port}: accept failed: {exc}", flush=True)
                continue
            accepted = time.perf_counter()
            with connection:
                record = _handle(connection, port, accepted, buffer)
            with self._lock:
                self._records.append(record)


def _listen(address: IPv4Address, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((str(address), port))
    except OSError as exc:
        listener.close()
        raise OSError(
            exc.errno,
            f"cannot listen on {address}:{port}: {exc.strerror}; another program may listen on "
            "that port, so pick other proxy ports",
        ) from exc
    listener.listen(128)
    listener.settimeout(ACCEPT_POLL_SECONDS)
    return listener


def _handle(connection: socket.socket, port: int, accepted: float, buffer: bytearray) -> Connection:
    # A blocking socket with kernel receive and send timeouts avoids the poll() that Python
    # adds before every call on a socket with a Python-level timeout.
    connection.setblocking(True)
    limit = struct.pack("ll", IDLE_TIMEOUT_SECONDS, 0)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    original = _original_destination(connection)
    received = 0
    answered = False
    try:
        count = connection.recv_into(buffer)
        received = count
        if buffer[:1] == b"p":
            view = memoryview(buffer)
            while count and b"\n" not in buffer[:received] and received < REQUEST_MAX_BYTES:
                count = connection.recv_into(view[received:REQUEST_MAX_BYTES])
                received += count
            connection.sendall(RESPONSE)
            answered = True
        else:
            while count:
                count = connection.recv_into(buffer)
                received += count
    except OSError:
        # A reset or idle client; the record's byte count or `answered` shows the failure.
        pass
    return Connection(
        listener=port,
        original=original,
        accepted=accepted,
        closed=time.perf_counter(),
        received=received,
        answered=answered,
    )


def _original_destination(connection: socket.socket) -> tuple[str, int] | None:
    try:
        address = connection.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None  # no conntrack entry for this connection
    port, packed = struct.unpack_from("!H4s", address, 2)
    return socket.inet_ntoa(packed), int(port)


class AgentShell:
    """Run busybox shell commands in the agent's container with a hard time limit."""

    def __init__(self, container_id: str) -> None:
        self.container_id = container_id

    def run(self, script: str, *, limit: float) -> None:
        """Run `script` with `sh -c`; raises RuntimeError if it fails or outlives `limit` s.

        busybox `timeout` kills the shell after `limit` seconds. The docker CLI gets 30 s more,
        because an `nc` that outlived its shell ends when the sink drops idle connections.
        """
        command = [
            "docker", "exec", self.container_id,
            "timeout", "-s", "KILL", str(int(limit)), "sh", "-c", script,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, timeout=limit + 30, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"docker exec did not end within {limit + 30:g} s") from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")[-500:]
            raise RuntimeError(
                f"client in the agent exited with status {result.returncode}: {output!r}"
            )


def stream(shell: AgentShell, sink: Sink, route: Route, *, megabytes: int) -> float:
    """Send `megabytes` MB in one connection along `route`; return MB/s as the sink timed it.

    Raises RuntimeError when the client fails, bytes are missing or the route is wrong.
    """
    sink.take()
    script = STREAM_SCRIPT.format(megabytes=megabytes, host=route.host, port=route.port)
    shell.run(script, limit=60 + megabytes / 10)
    records = sink.wait_for(1)
    route.check(records)
    (record,) = records
    if record.received != megabytes * 1_000_000:
        raise RuntimeError(f"the sink received {record.received} bytes, expected {megabytes} MB")
    return record.received / 1e6 / (record.closed - record.accepted)


def connect_many(shell: AgentShell, sink: Sink, route: Route, *, count: int) -> float:
    """Open `count` request/response connections one after another; return connections/s.

    The rate divides `count` by the time from the first accept to the last close. Raises
    RuntimeError when the client fails, a response is missing or the route is wrong.
    """
    sink.take()
    script = CONNECT_SCRIPT.format(
        count=count, connect_timeout=CONNECT_TIMEOUT_SECONDS, host=route.host, port=route.port
    )
    shell.run(script, limit=60 + count / 20)
    records = sink.wait_for(count)
    route.check(records)
    unanswered = sum(1 for record in records if not record.answered)
    if unanswered:
        raise RuntimeError(f"{unanswered} of {count} connections got no response")
    return count / (records[-1].closed - records[0].accepted)
