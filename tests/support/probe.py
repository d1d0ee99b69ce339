"""Network probes run inside a real agent container, for the firewall tests.

The probe agent is a busybox image started through the gateway like any other agent. It
serves HTTP on port 80, so the supervisor's readiness probe passes, and on port 1234, so
another agent has a second port to try. A test runs each probe with `docker exec` as the
agent's own user 65534 and reads its exit status and output. The image adds icmp-echo and
curl (probe_tools.py) for what busybox cannot do as that user, so every client runs inside the
agent and, under runsc, uses gVisor's network stack like any agent program.

Every network command is wrapped in `timeout` directly, not around a shell, because a killed
shell would leave its child holding the exec's output open. Debian 12's busybox-static
`wget -T` crashes, which is one more reason to use `timeout`.
"""

from __future__ import annotations

import enum
import json
import shlex
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import docker
import httpx

from tests.support.images import build_busybox_image
from tests.support.probe_tools import curl_files, icmp_echo_file

PROBE_USER = "65534:65534"
PROBE_TIMEOUT_SECONDS = 3
LATERAL_PORT = 1234
# Exit statuses of a command that `timeout` ended: busybox sends SIGTERM (128 + 15), and
# coreutils' timeout exits with 124.
TIMED_OUT_STATUSES = frozenset({124, 143})
# Seconds icmp-echo waits for the reply, below PROBE_TIMEOUT_SECONDS so that it prints
# "no reply" before `timeout` ends it.
ICMP_REPLY_SECONDS = 2
ETHERTYPE_ARP = 0x0806

PROBE_ENTRYPOINT = f"""#!/bin/sh
# Probe agent: serve /www over HTTP on port 80 and on port {LATERAL_PORT}. busybox httpd logs
# each request to stderr (-v), which shows whether another agent reached this one.
echo "probe-agent: listening on ports 80 and {LATERAL_PORT}"
httpd -v -p {LATERAL_PORT} -h /www
exec httpd -f -v -p 80 -h /www
""".encode()


class Outcome(enum.Enum):
    """How a probe's client command ended."""

    SUCCEEDED = "succeeded"
    TIMED_OUT = "timed out"
    FAILED = "failed"


@dataclass(frozen=True)
class ProbeResult:
    """Exit status, output and duration of one probe command."""

    command: str
    exit_code: int
    output: bytes
    seconds: float

    @property
    def outcome(self) -> Outcome:
        """SUCCEEDED on status 0, TIMED_OUT when `timeout` ended the command, else FAILED."""
        if self.exit_code == 0:
            return Outcome.SUCCEEDED
        if self.exit_code in TIMED_OUT_STATUSES:
            return Outcome.TIMED_OUT
        return Outcome.FAILED

    @property
    def text(self) -> str:
        """Output decoded for reading, with undecodable bytes replaced."""
        return self.output.decode(errors="replace")

    def __str__(self) -> str:
        return (
            f"{self.command!r} exited {self.exit_code} ({self.outcome.value}) after "
            f"{self.seconds:.1f} s with output {self.text[-300:]!r}"
        )


def build_probe_image(client: docker.DockerClient) -> str:
    """Import the probe agent, with icmp-echo and curl, as an image and return its ID.

    Raises FileNotFoundError without gcc or curl on the host.
    """
    return build_busybox_image(
        client,
        entrypoint=["/entrypoint.sh"],
        cmd=None,
        extra_files={
            "entrypoint.sh": PROBE_ENTRYPOINT,
            "www/index.html": b"probe-agent\n",
            **icmp_echo_file(),
            **curl_files(),
        },
    )


@dataclass(frozen=True)
class ProbeAgent:
    """A probe agent started through the gateway, and its container."""

    agent_id: str
    container: Any  # docker.models.containers.Container, untyped in docker-py
    address: str
    mac: str

    def run(self, command: str, *, user: str = PROBE_USER, privileged: bool = False) -> ProbeResult:
        """Run a shell command in the agent's container and return its result.

        The command must bound its own network calls (see the probe builders below); exec_run
        itself has no timeout.
        """
        started = time.monotonic()
        exit_code, output = self.container.exec_run(
            ["sh", "-c", command], user=user, privileged=privileged
        )
        return ProbeResult(
            command=command,
            exit_code=int(exit_code),
            output=bytes(output),
            seconds=time.monotonic() - started,
        )

    def ping(self, host: str) -> ProbeResult:
        """Send one ICMP echo request to `host` from inside the agent, as the agent's user.

        busybox ping needs a raw socket, which the agent's user may not open (no CAP_NET_RAW),
        so icmp-echo uses an ICMP datagram socket, which runc's kernel allows for the groups
        in net.ipv4.ping_group_range (Docker 20.10 sets "0 2147483647" in the agent's
        namespace) and gVisor's netstack allows too (runsc 0.0~20221219). The output is
        "reply from <address>" with status 0, or "no reply" with status 1.
        """
        return self.run(
            f"timeout {PROBE_TIMEOUT_SECONDS} icmp-echo {shlex.quote(host)} {ICMP_REPLY_SECONDS}"
        )

    def teach_neighbour(self, address: str, mac: str) -> None:
        """Make the agent's own network stack learn that `address` is at `mac`.

        The agent cannot add a neighbour entry itself, and under runsc no host tool can either,
        because gVisor keeps its own neighbour table and supports no `ip neigh`. Both Linux
        and gVisor (runsc 0.0~20221219) store the sender of an ARP request whose target is
        their own address. So this sends such a request, "who has <agent>? tell <address> at
        <mac>", into the agent's eth0 from the host's end of its veth pair, where the bridge's
        firewall never filters it. Tests use it to send IPv4 to another agent although ARP
        between agents is dropped.
        """
        frame = (
            mac_bytes(self.mac)
            + mac_bytes(mac)
            + struct.pack("!H", ETHERTYPE_ARP)
            # Ethernet, IPv4, 6-byte and 4-byte addresses, request.
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac_bytes(mac)
            + socket.inet_aton(address)
            + bytes(6)
            + socket.inet_aton(self.address)
        )
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sender:
            sender.bind((self.host_interface(), 0))
            sender.send(frame)

    def forget_neighbour(self, address: str) -> None:
        """Remove the host kernel's ARP entry for `address` in the agent's namespace.

        Under runc that is the agent's own entry, so the next packet to `address` needs an
        ARP request. NOTE: under runsc it clears nothing of the agent's, because gVisor keeps
        its own neighbour table. An entry that teach_neighbour added there stays until
        gVisor's own ARP probes, which the firewall drops, time out.
        """
        result = self._in_namespace(["ip", "neigh", "flush", "to", address, "dev", "eth0"])
        assert result.exit_code == 0, str(result)

    def host_interface(self) -> str:
        """Return the name of the host's end of the agent's veth pair, a port of the bridge."""
        result = self._in_namespace(["ip", "-j", "link", "show", "dev", "eth0"])
        assert result.exit_code == 0, str(result)
        [link] = json.loads(result.output)
        return socket.if_indextoname(int(link["link_index"]))

    @property
    def published_port(self) -> int:
        """Host port on which Docker publishes the agent's port 80 (on 127.0.0.1)."""
        self.container.reload()
        return int(self.container.attrs["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"])

    def logs(self) -> str:
        """Return what the agent has written to stdout and stderr so far."""
        return bytes(self.container.logs()).decode(errors="replace")

    def _in_namespace(self, command: list[str]) -> ProbeResult:
        self.container.reload()
        pid = int(self.container.attrs["State"]["Pid"])
        full = [
            "timeout",
            str(PROBE_TIMEOUT_SECONDS),
            "nsenter",
            f"--target={pid}",
            "--net",
            *command,
        ]
        started = time.monotonic()
        result = subprocess.run(full, capture_output=True, check=False, timeout=30)
        return ProbeResult(
            command=shlex.join(full),
            exit_code=result.returncode,
            output=result.stdout + result.stderr,
            seconds=time.monotonic() - started,
        )


def start_probe_agent(
    api: httpx.Client,
    client: docker.DockerClient,
    *,
    image_url: str,
    image_digest: str,
    network: str,
) -> ProbeAgent:
    """Start a probe agent through the gateway, wait until it is ready, and return it.

    Raises AssertionError when the gateway does not accept it or it does not become ready.
    """
    response = api.post(
        "/v1/agents",
        params={"wait": "true"},
        json={"image_url": image_url, "image_digest": image_digest},
    )
    assert response.status_code == 202, response.text
    agent = response.json()
    assert agent["state"] == "ready", agent

    container = client.containers.get(agent["container_id"])
    settings = container.attrs["NetworkSettings"]["Networks"][network]
    return ProbeAgent(
        agent_id=agent["agent_id"],
        container=container,
        address=settings["IPAddress"],
        mac=settings["MacAddress"],
    )


def tcp_probe(host: str, port: int, *, payload: bytes = b"GET / HTTP/1.0\r\n\r\n") -> str:
    """Return a command that sends `payload` over TCP and prints the reply."""
    return f"printf {shell_bytes(payload)} | timeout {PROBE_TIMEOUT_SECONDS} nc {host} {port}"


def http_probe(url: str) -> str:
    """Return a command that fetches `url` with wget and prints the body."""
    return f"timeout {PROBE_TIMEOUT_SECONDS} wget -q -O - {shlex.quote(url)}"


def dns_udp_probe(name: str, server: str, *, port: int = 53) -> str:
    """Return a command that looks up `name` at server:port over UDP with nslookup."""
    target = server if port == 53 else f"{server}:{port}"
    return f"timeout {PROBE_TIMEOUT_SECONDS} nslookup {shlex.quote(name)} {target}"


def dns_tcp_probe(name: str, server: str) -> str:
    """Return a command that sends an A query for `name` over TCP to server:53.

    The reply is binary; parse it with dns_answer_address().
    """
    query = dns_query(name)
    return tcp_probe(server, 53, payload=struct.pack("!H", len(query)) + query)


def dns_query(name: str, *, query_id: int = 0x4242) -> bytes:
    """Return a DNS query packet asking for the A record of `name`, with recursion desired."""
    packet = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        packet += bytes([len(label)]) + label.encode("ascii")
    return packet + b"\0" + struct.pack("!HH", 1, 1)


def dns_answer_address(reply: bytes) -> str | None:
    """Return the address of the A record in a DNS-over-TCP reply, or None without answers.

    Parses only what fakenet_listeners.py writes: one question, then at most one A record
    whose name points back to the question.
    """
    if len(reply) < 2 + 12:
        return None
    packet = reply[2:]
    answers = struct.unpack_from("!H", packet, 6)[0]
    if answers == 0:
        return None
    # The address is the last 4 bytes of a reply that ends with an A record.
    return ".".join(str(byte) for byte in packet[-4:])


def mac_bytes(mac: str) -> bytes:
    """Return the 6 bytes of a MAC address written as "02:42:ac:1d:04:02"."""
    return bytes(int(part, 16) for part in mac.split(":"))


def shell_bytes(data: bytes) -> str:
    """Quote bytes as a busybox printf format string, every byte as an octal escape."""
    return "'" + "".join(f"\\{byte:03o}" for byte in data) + "'"
