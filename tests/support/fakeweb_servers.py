"""HTTP, HTTPS and DNS servers of the proxy tests' fake web, run inside its network namespace.

tests/support/fakeweb.py runs this file as a script with the project's interpreter (the DNS
server builds its answers with dnspython): `ip netns exec NAME python fakeweb_servers.py ...`.
Every connection, request, TLS handshake and DNS query becomes one JSON line in the log file,
written before any reply, so a test that reads the log after its client returned sees all of
them. The first line is `{"event": "ready", ...}`, written once every socket is bound.

Servers:

- HTTP/1.1 on port 80 of each --http address. GET returns `<role> <address>`, except that
  paths starting with `/redirect` return 302 to --redirect-to. POST to a path starting with
  `/echo-length` reads the body (Content-Length or chunked) and returns `received <n> bytes`.
- The same handler over TLS on port 443 of each --https address, with --cert and --key.
- DNS on UDP and TCP port 53 of --dns, answering by RULES below.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import itertools
import json
import os
import signal
import socket
import socketserver
import ssl
import struct
import threading
import time
from typing import Any

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

PUBLIC_ADDRESS = "198.51.100.10"
LINK_LOCAL_ADDRESS = "169.254.42.42"
# Suffix-matched in order; the first rule that matches a query name decides its A answer.
RULES: tuple[tuple[str, str], ...] = (
    ("linklocal.allowed.test", LINK_LOCAL_ADDRESS),
    ("allowed.test", PUBLIC_ADDRESS),
)
REBIND_NAME = "rebind.allowed.test"
DEFAULT_ANSWER = PUBLIC_ADDRESS
ANSWER_TTL = 60
READ_TIMEOUT_SECONDS = 5.0
MAX_DATAGRAM = 4096
# Bodies of /echo-length are counted, not kept, so any size works. This only bounds one read.
READ_CHUNK = 65536


class EventLog:
    """The JSON-lines log file, shared by every server thread."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": time.time(), **fields}
        with self._lock:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()


class WebServer(http.server.ThreadingHTTPServer):
    """An HTTP server that logs every accepted connection, optionally speaking TLS."""

    daemon_threads = True

    def __init__(
        self,
        address: str,
        port: int,
        *,
        role: str,
        log: EventLog,
        redirect_to: str,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.role = role
        self.log = log
        self.redirect_to = redirect_to
        self.tls = tls
        self.local_address = address
        super().__init__((address, port), WebHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the address's name with getfqdn, which would wait
        # for resolvers that the namespace cannot reach.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.local_address
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        # Logged on accept, before the handler thread reads anything: a client that never
        # sends a byte still counts as a connection.
        self.log.write(
            "connection",
            role=self.role,
            local=self.local_address,
            port=self.server_address[1],
            peer=client_address[0],
        )
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # The handshake runs here, in the connection's own thread, so a client that stops
        # half way does not block other connections.
        request.settimeout(READ_TIMEOUT_SECONDS)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.log.write("tls_failed", role=self.role, peer=client_address[0], error=str(exc))
            return
        self.log.write("tls", role=self.role, peer=client_address[0])
        with wrapped:
            super().finish_request(wrapped, client_address)


class WebHandler(http.server.BaseHTTPRequestHandler):
    """Real HTTP/1.1: keep-alive, Content-Length on every response, chunked request bodies."""

    protocol_version = "HTTP/1.1"
    server: WebServer
    timeout = READ_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._log_request(body_bytes=0)
        if self.path.startswith("/redirect"):
            self._reply(302, b"redirecting\n", location=self.server.redirect_to)
        else:
            self._reply(200, f"{self.server.role} {self.server.local_address}\n".encode())

    def do_POST(self) -> None:
        length = self._read_body()
        self._log_request(body_bytes=length)
        if self.path.startswith("/echo-length"):
            self._reply(200, f"received {length} bytes\n".encode())
        else:
            self._reply(404, b"not found\n")

    def _log_request(self, *, body_bytes: int) -> None:
        self.server.log.write(
            "request",
            role=self.server.role,
            local=self.server.local_address,
            peer=self.client_address[0],
            method=self.command,
            path=self.path,
            host=self.headers.get("Host"),
            body_bytes=body_bytes,
        )

    def _read_body(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        remaining = int(self.headers.get("Content-Length", "0"))
        total = 0
        while remaining > 0:
            data = self.rfile.read(min(remaining, READ_CHUNK))
            if not data:
                break
            total += len(data)
            remaining -= len(data)
        return total

    def _read_chunked(self) -> int:
        total = 0
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return total
            remaining = size
            while remaining > 0:
                data = self.rfile.read(min(remaining, READ_CHUNK))
                if not data:
                    return total
                total += len(data)
                remaining -= len(data)
            self.rfile.readline()

    def _reply(self, status: int, body: bytes, *, location: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if location is not None:
            self.send_header("Location", location)
        self.end_headers()
        self.wfile.write(body)


class Resolver:
    """The DNS rules: fixed answers by name, and one name whose answer alternates."""

    def __init__(self) -> None:
        self._rebind = itertools.cycle((PUBLIC_ADDRESS, LINK_LOCAL_ADDRESS))
        self._lock = threading.Lock()

    def answer(self, query: dns.message.Message) -> tuple[dns.message.Message, str, str]:
        """Return the response to `query` with the question's name and type as text."""
        response = dns.message.make_response(query)
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response, "", ""
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = question.rdtype
        type_text = dns.rdatatype.to_text(rdtype)
        if rdtype != dns.rdatatype.A:
            # Every name exists, with A records only: other types get an empty answer.
            return response, name, type_text

        if name == REBIND_NAME:
            with self._lock:
                address = next(self._rebind)
            ttl = 0
        else:
            address = next(
                (
                    answer
                    for suffix, answer in RULES
                    if name == suffix or name.endswith("." + suffix)
                ),
                DEFAULT_ANSWER,
            )
            ttl = ANSWER_TTL
        response.answer.append(
            dns.rrset.from_text(question.name, ttl, dns.rdataclass.IN, dns.rdatatype.A, address)
        )
        return response, name, type_text


def serve_dns_udp(sock: socket.socket, resolver: Resolver, log: EventLog) -> None:
    while True:
        data, peer = sock.recvfrom(MAX_DATAGRAM)
        reply = handle_dns(data, peer, "udp", resolver, log)
        if reply is not None:
            with contextlib.suppress(OSError):
                sock.sendto(reply, peer)


def serve_dns_tcp(listener: socket.socket, resolver: Resolver, log: EventLog) -> None:
    while True:
        connection, peer = listener.accept()
        threading.Thread(
            target=handle_dns_tcp, args=(connection, peer, resolver, log), daemon=True
        ).start()


def handle_dns_tcp(connection: socket.socket, peer: Any, resolver: Resolver, log: EventLog) -> None:
    with connection, contextlib.suppress(OSError):
        connection.settimeout(READ_TIMEOUT_SECONDS)
        while True:
            header = _read_exactly(connection, 2)
            if header is None:
                return
            data = _read_exactly(connection, struct.unpack("!H", header)[0])
            if data is None:
                return
            reply = handle_dns(data, peer, "tcp", resolver, log)
            if reply is None:
                return
            connection.sendall(struct.pack("!H", len(reply)) + reply)


def _read_exactly(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        part = connection.recv(size - len(data))
        if not part:
            return None
        data += part
    return data


def handle_dns(
    data: bytes, peer: Any, transport: str, resolver: Resolver, log: EventLog
) -> bytes | None:
    try:
        query = dns.message.from_wire(data)
    except Exception as exc:  # any unparsable datagram is logged and gets no reply
        log.write("dns_invalid", peer=peer[0], transport=transport, error=repr(exc))
        return None
    response, name, type_text = resolver.answer(query)
    log.write(
        "dns",
        peer=peer[0],
        transport=transport,
        name=name,
        type=type_text,
        answer=[item.to_text() for rrset in response.answer for item in rrset],
    )
    return response.to_wire()


def bind(kind: int, address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="JSON-lines file to append events to")
    parser.add_argument(
        "--http", action="append", default=[], help="ROLE=ADDRESS of an HTTP server on port 80"
    )
    parser.add_argument(
        "--https", action="append", default=[], help="ROLE=ADDRESS of a TLS server on port 443"
    )
    parser.add_argument("--dns", required=True, help="address of the DNS server (port 53)")
    parser.add_argument("--cert", required=True, help="PEM certificate of the TLS servers")
    parser.add_argument("--key", required=True, help="PEM private key of the TLS servers")
    parser.add_argument(
        "--redirect-to", required=True, help="Location header of /redirect responses"
    )
    args = parser.parse_args()

    log = EventLog(args.log)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    # busybox's own TLS client (BusyBox 1.35) offers TLS 1.2 without the signature_algorithms
    # extension, so the server must sign its key exchange with SHA-1, which OpenSSL 3 allows
    # only at security level 0.
    tls.set_ciphers("DEFAULT:@SECLEVEL=0")

    def log_client_hello(sock: Any, server_name: str | None, _: ssl.SSLContext) -> None:
        # OpenSSL calls this for every ClientHello, with None when it has no server name. The
        # event is logged here because a client that sends only a ClientHello never completes
        # the handshake.
        peer = None
        with contextlib.suppress(OSError):
            peer = sock.getpeername()[0]
        log.write("client_hello", peer=peer, sni=server_name)

    tls.sni_callback = log_client_hello

    servers: list[socketserver.BaseServer] = []
    for spec, port, context in itertools.chain(
        ((spec, 80, None) for spec in args.http), ((spec, 443, tls) for spec in args.https)
    ):
        role, _, address = spec.partition("=")
        servers.append(
            WebServer(address, port, role=role, log=log, redirect_to=args.redirect_to, tls=context)
        )
    resolver = Resolver()
    udp = bind(socket.SOCK_DGRAM, args.dns, 53)
    tcp = bind(socket.SOCK_STREAM, args.dns, 53)

    # Blocked before any thread starts, so every thread inherits the mask and only the
    # sigwait below takes the signal.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers]
    threads.append(threading.Thread(target=serve_dns_udp, args=(udp, resolver, log), daemon=True))
    threads.append(threading.Thread(target=serve_dns_tcp, args=(tcp, resolver, log), daemon=True))
    for thread in threads:
        thread.start()
    log.write("ready", pid=os.getpid())

    # The server threads never return, so this process runs until the parent sends SIGTERM.
    signal.sigwait(stop_signals)
    log.write("stopped", pid=os.getpid())


if __name__ == "__main__":
    main()
