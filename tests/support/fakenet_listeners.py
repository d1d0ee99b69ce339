"""Logging TCP and UDP listeners for the fake network of the firewall tests.

tests/support/fakenet.py runs this file as a script, with only the standard library: inside a
fake host's network namespace (`ip netns exec NAME python fakenet_listeners.py ...`) and in the
host namespace as a stand-in for the proxy. Every connection or datagram that arrives becomes
one JSON line in the log file, written before any reply, so a test that reads the log after its
client returned sees every hit. The first line is `{"event": "ready", ...}`, written once every
socket is bound.

Replies let a client tell who answered: a DNS query for a name under `.test` gets an A record
with --dns-answer, any other datagram or TCP connection gets the text
`<role> port=<port> original=<address>` (in an HTTP/1.0 response on TCP).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import struct
import threading
import time
from typing import Any

# Linux values from <linux/in.h> and <linux/netfilter_ipv4.h>, which Python 3.11's socket
# module does not define.
IP_PKTINFO = 8
SO_ORIGINAL_DST = 80

DNS_HEADER = struct.Struct("!HHHHHH")
DNS_TYPE_A = 1
DNS_CLASS_IN = 1
DNS_RCODE_NXDOMAIN = 3
DNS_SUFFIX = ".test"
MAX_DATAGRAM = 4096
READ_TIMEOUT_SECONDS = 1.0
LOGGED_BYTES = 200


class HitLog:
    """The JSON-lines log file, shared by every listener thread."""

    def __init__(self, path: str, role: str) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        self._lock = threading.Lock()
        self.role = role

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "role": self.role, "time": time.time(), **fields}
        with self._lock:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()


def plain_address(address: str) -> str:
    """Return an IPv4-mapped IPv6 address as plain IPv4 and any other address unchanged."""
    parsed = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def printable(data: bytes) -> str:
    return data[:LOGGED_BYTES].decode("latin-1").encode("unicode_escape").decode("ascii")


def parse_dns_question(packet: bytes) -> tuple[int, int, str, int, int] | None:
    """Return (id, flags, name, qtype, end of question) of a DNS query, or None for other data."""
    if len(packet) < DNS_HEADER.size:
        return None
    query_id, flags, questions, _, _, _ = DNS_HEADER.unpack_from(packet)
    if flags & 0x8000 or questions < 1:
        return None
    labels = []
    offset = DNS_HEADER.size
    while offset < len(packet):
        length = packet[offset]
        offset += 1
        if length == 0:
            break
        if length > 63 or offset + length > len(packet):
            return None
        labels.append(packet[offset : offset + length].decode("latin-1"))
        offset += length
    else:
        return None
    if offset + 4 > len(packet):
        return None
    qtype, _ = struct.unpack_from("!HH", packet, offset)
    return query_id, flags, ".".join(labels), qtype, offset + 4


def dns_reply(packet: bytes, answer: str) -> tuple[bytes, str] | None:
    """Build the reply to a DNS query and return it with the queried name, or None."""
    question = parse_dns_question(packet)
    if question is None:
        return None
    query_id, flags, name, qtype, end = question

    # Response with the query's opcode and RD bit, and RA set. Names under .test exist and all
    # others are NXDOMAIN. A .test name has an A record only, so other types get no records.
    reply_flags = 0x8080 | (flags & 0x7900)
    answers = b""
    if not name.lower().rstrip(".").endswith(DNS_SUFFIX):
        reply_flags |= DNS_RCODE_NXDOMAIN
    elif qtype == DNS_TYPE_A:
        answers = struct.pack("!HHHIH", 0xC00C, DNS_TYPE_A, DNS_CLASS_IN, 60, 4)
        answers += socket.inet_aton(answer)
    header = DNS_HEADER.pack(query_id, reply_flags, 1, 1 if answers else 0, 0, 0)
    return header + packet[DNS_HEADER.size : end] + answers, name


def original_destination(connection: socket.socket) -> str | None:
    """Return "address:port" that a TCP connection was sent to before NAT, if it has one."""
    try:
        raw = connection.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port = struct.unpack_from("!H", raw, 2)[0]
    return f"{socket.inet_ntoa(raw[4:8])}:{port}"


def marker(role: str, port: int, original: str | None) -> bytes:
    return f"{role} port={port} original={original}\n".encode()


def serve_tcp(listener: socket.socket, log: HitLog, *, dns: bool, answer: str) -> None:
    while True:
        connection, peer = listener.accept()
        threading.Thread(
            target=handle_tcp, args=(connection, peer, log, dns, answer), daemon=True
        ).start()


def handle_tcp(connection: socket.socket, peer: Any, log: HitLog, dns: bool, answer: str) -> None:
    with connection:
        local = connection.getsockname()
        original = original_destination(connection)
        connection.settimeout(READ_TIMEOUT_SECONDS)
        data = b""
        # A silent client still counts as a hit.
        with contextlib.suppress(OSError):
            data = connection.recv(MAX_DATAGRAM)

        reply = None
        if dns and len(data) > 2:
            reply = dns_reply(data[2:], answer)
        log.write(
            "tcp",
            local=plain_address(local[0]),
            port=local[1],
            peer=plain_address(peer[0]),
            peer_port=peer[1],
            original_dst=original,
            data=printable(data),
            dns_name=reply[1] if reply else None,
        )

        if reply is not None:
            payload = struct.pack("!H", len(reply[0])) + reply[0]
        else:
            body = marker(log.role, local[1], original)
            payload = (
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
        # A client that left gets no reply, but its hit is logged.
        with contextlib.suppress(OSError):
            connection.sendall(payload)


def serve_udp(sock: socket.socket, log: HitLog, *, port: int, answer: str) -> None:
    ipv6 = sock.family == socket.AF_INET6
    space = socket.CMSG_SPACE(20 if ipv6 else 12)
    while True:
        data, ancillary, _, peer = sock.recvmsg(MAX_DATAGRAM, space)
        local = destination_of(ancillary)
        reply = dns_reply(data, answer)
        log.write(
            "udp",
            local=local,
            port=port,
            peer=plain_address(peer[0]),
            peer_port=peer[1],
            original_dst=None,
            data=printable(data),
            dns_name=reply[1] if reply else None,
        )

        # Reply from the address the datagram was sent to. With several addresses on one
        # interface, the kernel would otherwise pick a source the client does not expect.
        payload = reply[0] if reply else marker(log.role, port, None)
        ancillary_out = []
        if local is not None:
            ancillary_out.append(source_ancillary(local, ipv6=ipv6))
        # An unreachable client gets no reply, but its hit is logged.
        with contextlib.suppress(OSError):
            sock.sendmsg([payload], ancillary_out, 0, peer)


def destination_of(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return plain_address(socket.inet_ntop(socket.AF_INET6, data[:16]))
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            return socket.inet_ntoa(data[8:12])
    return None


def source_ancillary(local: str, *, ipv6: bool) -> tuple[int, int, bytes]:
    if ipv6:
        mapped = ipaddress.ip_address(local)
        if isinstance(mapped, ipaddress.IPv4Address):
            mapped = ipaddress.IPv6Address(f"::ffff:{local}")
        return socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, mapped.packed + struct.pack("=I", 0)
    return socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, socket.inet_aton(local), b"")


def bind(kind: int, port: int, *, ipv6: bool) -> socket.socket:
    """Bind a socket to every address: dual-stack "::" with --ipv6, else 0.0.0.0."""
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ipv6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    else:
        sock.bind(("0.0.0.0", port))
    if kind == socket.SOCK_DGRAM:
        if ipv6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.listen(64)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="JSON-lines file to append hits to")
    parser.add_argument("--role", required=True, help="name written in every log line")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="TCP port")
    parser.add_argument("--udp", type=int, action="append", default=[], help="UDP port")
    parser.add_argument(
        "--dns-tcp", type=int, action="append", default=[], help="TCP port that speaks DNS"
    )
    parser.add_argument("--dns-answer", default="127.0.0.1", help="A record for *.test")
    parser.add_argument("--ipv6", action="store_true", help="listen on IPv6 addresses too")
    args = parser.parse_args()

    log = HitLog(args.log, args.role)
    threads = []
    for port in sorted(set(args.tcp) | set(args.dns_tcp)):
        listener = bind(socket.SOCK_STREAM, port, ipv6=args.ipv6)
        dns = port in args.dns_tcp
        threads.append(
            threading.Thread(
                target=serve_tcp,
                args=(listener, log),
                kwargs={"dns": dns, "answer": args.dns_answer},
                daemon=True,
            )
        )
    for port in sorted(set(args.udp)):
        sock = bind(socket.SOCK_DGRAM, port, ipv6=args.ipv6)
        threads.append(
            threading.Thread(
                target=serve_udp,
                args=(sock, log),
                kwargs={"port": port, "answer": args.dns_answer},
                daemon=True,
            )
        )
    for thread in threads:
        thread.start()
    log.write("ready", pid=os.getpid())

    # The listener threads never return, so this process runs until the parent sends SIGTERM.
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
