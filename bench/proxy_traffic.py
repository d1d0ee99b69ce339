"""Fake upstream, fake DNS and load client of the proxy benchmark, each run in a namespace.

bench/proxy.py starts this module as a subprocess with `ip netns exec`:

- `serve` runs in the upstream namespace. It is an HTTP/1.1 server that returns the same
  small body for every GET and keeps the connection open unless the request contains
  `Connection: close`, as a typical web server does. Each response names the client address
  it saw in `X-Upstream-Peer`, so the load client can tell which way a request came. The same
  process is the fake DNS server: A records for `allowed.test` and its subdomains, an empty
  answer with an SOA record for their AAAA (so resolvers cache the absence), NXDOMAIN for
  every other name.
- `load` runs in the client namespace. It sends GET requests over a new TCP connection each
  (`Connection: close`, as an agent's typical call) from a fixed number of concurrent workers,
  and prints the latencies of the measured requests as one JSON object on standard output.

Both use uvloop, so the benchmark's own Python code takes as little CPU from the proxies as
it can.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import uvloop

# TTL of the fake A records and of the negative results (the SOA minimum), in seconds. Both
# proxies cap or keep it as they would a real server's.
DNS_TTL = 300
MAX_HEAD_BYTES = 16 * 1024


class ResponseError(Exception):
    """A response that was cut short, malformed or not what the benchmark expects."""


@dataclass
class LoadResult:
    """Result of one `load` run; times are in seconds."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    # CPU time of the client process itself during the measured requests.
    cpu: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    peers: dict[str, int] = field(default_factory=dict)


# Fake upstream and DNS


class _HttpHandler(asyncio.Protocol):
    """Respond to each GET with the fixed body; close after a request with `Connection: close`."""

    def __init__(self, body: bytes, delay: float = 0.0) -> None:
        self._body = body
        self._delay = delay
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._peer = "unknown"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "unknown"

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self._buffer[:end]).lower()
            del self._buffer[: end + 4]
            close = b"\r\nconnection: close" in head
            if self._delay:
                # Stands for the round trip to a server on the internet.
                asyncio.get_running_loop().call_later(
                    self._delay, self._send, self._response(head, close=close), close
                )
            else:
                self._send(self._response(head, close=close), close)
            if close:
                return
        if len(self._buffer) > MAX_HEAD_BYTES:
            self._transport.close()

    def _send(self, response: bytes, close: bool) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(response)
        if close:
            self._transport.close()

    def _response(self, head: bytes, *, close: bool) -> bytes:
        if not head.startswith(b"get "):
            status, body, close = "405 Method Not Allowed", b"", True
        else:
            status, body = "200 OK", self._body
        lines = [
            f"HTTP/1.1 {status}",
            "Content-Type: text/plain",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            f"X-Upstream-Peer: {self._peer}",
        ]
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _DnsHandler(asyncio.DatagramProtocol):
    """Resolve A queries for the zone and its subdomains to one address; see module doc."""

    def __init__(self, zone: str, address: str) -> None:
        self._zone = dns.name.from_text(zone)
        self._address = address
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        assert self._transport is not None
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        if len(query.question) != 1:
            return
        question = query.question[0]
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not question.name.is_subdomain(self._zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
        elif question.rdtype == dns.rdatatype.A:
            response.answer.append(
                dns.rrset.from_text(question.name, DNS_TTL, "IN", "A", self._address)
            )
        else:
            response.authority.append(self._soa())
        self._transport.sendto(response.to_wire(), addr)

    def _soa(self) -> dns.rrset.RRset:
        return dns.rrset.from_text(
            self._zone,
            DNS_TTL,
            "IN",
            "SOA",
            f"ns.{self._zone} hostmaster.{self._zone} 1 3600 600 86400 {DNS_TTL}",
        )


async def serve(args: argparse.Namespace) -> None:
    """Serve HTTP and DNS until SIGTERM; print `ready` once both sockets are bound."""
    loop = asyncio.get_running_loop()
    body = b"x" * (args.body_bytes - 1) + b"\n"
    server = await loop.create_server(
        lambda: _HttpHandler(body, args.delay_ms / 1000),
        args.http_address,
        args.http_port,
        backlog=1024,
    )
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _DnsHandler(args.zone, args.record_address),
        local_addr=(args.dns_address, args.dns_port),
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    transport.close()
    server.close()
    await server.wait_closed()


# Load client


class _Exchange(asyncio.Protocol):
    """Send one request and resolve `done` with (status, upstream peer) once the body is in."""

    def __init__(self, request: bytes, done: asyncio.Future[tuple[int, str]]) -> None:
        self._request = request
        self._done = done
        self._buffer = bytearray()
        self._head_end = -1
        self._status = 0
        self._peer = ""
        self._length = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._head_end < 0:
            self._head_end = self._buffer.find(b"\r\n\r\n")
            if self._head_end < 0:
                return
            try:
                self._parse_head(bytes(self._buffer[: self._head_end]))
            except ResponseError as exc:
                self._fail(exc)
                return
        if len(self._buffer) - self._head_end - 4 >= self._length and not self._done.done():
            self._done.set_result((self._status, self._peer))

    def _parse_head(self, head: bytes) -> None:
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ResponseError(f"malformed status line {status_line!r}")
        self._status = int(parts[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                self._length = int(value.strip())
            elif name.strip().lower() == "x-upstream-peer":
                self._peer = value.strip()
        if self._length < 0:
            raise ResponseError(f"response {status_line!r} has no Content-Length")

    def _fail(self, exc: Exception) -> None:
        if not self._done.done():
            self._done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ResponseError(f"connection closed before the response ended ({exc})"))


async def _one_request(host: str, port: int, request: bytes) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, str]] = loop.create_future()
    transport, _ = await loop.create_connection(lambda: _Exchange(request, done), host, port)
    try:
        return await done
    finally:
        transport.close()


async def _run_batch(
    args: argparse.Namespace, request: bytes, count: int, result: LoadResult | None
) -> None:
    """Send `count` requests from `args.concurrency` workers; record them in `result`."""
    remaining = count
    failures: Counter[str] = Counter()
    peers: Counter[str] = Counter()

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            began = time.perf_counter()
            try:
                async with asyncio.timeout(args.timeout):
                    status, peer = await _one_request(args.host, args.port, request)
            except (OSError, TimeoutError, ResponseError) as exc:
                failures[f"{type(exc).__name__}: {exc}"] += 1
                continue
            latency = time.perf_counter() - began
            if status != args.expect_status:
                failures[f"status {status}"] += 1
                continue
            peers[peer] += 1
            if result is not None:
                result.latencies.append(latency)

    began = time.perf_counter()
    cpu_began = time.process_time()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    if result is not None:
        result.elapsed = time.perf_counter() - began
        result.cpu = time.process_time() - cpu_began
        result.failures = dict(failures)
        result.peers = dict(peers)
    elif failures:
        raise ResponseError(f"warm-up requests failed: {dict(failures)}")


async def load(args: argparse.Namespace) -> LoadResult:
    """Run the warm-up, then the measured requests, and return what was measured."""
    request = (
        f"GET {args.target} HTTP/1.1\r\n"
        f"Host: {args.host_header}\r\n"
        "User-Agent: agent-runner-bench\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    result = LoadResult()
    await _run_batch(args, request, args.warmup, None)
    await _run_batch(args, request, args.requests, result)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the `serve` or `load` command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.proxy_traffic", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("serve", help="Run the fake upstream and DNS server.")
    server.add_argument("--http-address", required=True)
    server.add_argument("--http-port", type=int, default=80)
    server.add_argument("--dns-address", required=True)
    server.add_argument("--dns-port", type=int, default=53)
    server.add_argument("--zone", required=True, help="Name that DNS resolves, with subdomains.")
    server.add_argument("--record-address", required=True, help="IPv4 address of every A record.")
    server.add_argument("--body-bytes", type=int, default=256, help="Response body size.")
    server.add_argument(
        "--delay-ms", type=float, default=0.0, help="Milliseconds to wait before each response."
    )

    client = commands.add_parser("load", help="Send requests and print their latencies.")
    client.add_argument("--host", required=True, help="Address to connect to.")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--target", required=True, help="Request target: a path or a URL.")
    client.add_argument("--host-header", required=True)
    client.add_argument("--requests", type=int, required=True, help="Measured requests.")
    client.add_argument("--warmup", type=int, default=0, help="Unmeasured requests first.")
    client.add_argument("--concurrency", type=int, required=True)
    client.add_argument("--timeout", type=float, default=10.0, help="Seconds per request.")
    client.add_argument(
        "--expect-status", type=int, default=200, help="Status that counts as a success."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run `serve` until SIGTERM, or `load` and print its result as JSON."""
    args = parse_args(argv)
    if args.command == "serve":
        uvloop.run(serve(args))
        return 0
    result = uvloop.run(load(args))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
