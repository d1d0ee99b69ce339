"""A fake web for the proxy's end-to-end tests: HTTP, HTTPS and DNS servers in a namespace.

`fake_web()` creates the fake hosts' namespace of tests/support/fakenet.py (documentation
addresses and one link-local test address behind a veth pair), adds the fake resolver's
address, writes a self-signed certificate, and runs tests/support/fakeweb_servers.py inside
the namespace:

- 198.51.100.10:80 and 169.254.42.42:80 serve HTTP/1.1, each with its own body, so a test
  sees which host responded; paths starting with `/redirect` get a 302 to
  http://169.254.42.42/, and POST to paths starting with `/echo-length` returns the length
  of the request body;
- 198.51.100.10:443 answers the same over TLS with the self-signed certificate;
- 203.0.113.53:53 answers DNS by fixed rules (see fakeweb_servers.RULES) and logs every query.

Every connection, request, ClientHello and query is logged, so a test can also prove that
something never arrived. Only one fake web or fake internet can run at a time, because their
addresses are fixed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.fakenet import (
    FAKE_HOST,
    LINK_LOCAL_FAKE_HOST,
    FakeNetError,
    ListenerProcess,
    fake_namespace,
    route_type,
)

SERVERS_SCRIPT = Path(__file__).with_name("fakeweb_servers.py")

PUBLIC_HOST = FAKE_HOST
LINK_LOCAL_HOST = LINK_LOCAL_FAKE_HOST
DNS_SERVER = "203.0.113.53"
REDIRECT_TARGET = f"http://{LINK_LOCAL_HOST}/"
# Roles of the servers, as their logs and response bodies name them.
PUBLIC_WEB = "public-web"
LINK_LOCAL_WEB = "link-local-web"
PUBLIC_TLS = "public-tls"
CERTIFICATE_NAMES = ("allowed.test", "*.allowed.test")


@dataclass(frozen=True)
class FakeWeb:
    """The running fake web and its event log."""

    namespace: str
    certificate: Path
    servers: ListenerProcess

    def events(self, kind: str | None = None, *, since: int = 0) -> list[dict[str, Any]]:
        """Return the logged events after the first `since`, only those of `kind` when given.

        Kinds: `connection` (a TCP connection accepted by a web server), `client_hello`,
        `tls` (a completed handshake), `tls_failed`, `request`, `dns` and `dns_invalid`.
        """
        # The last line may still be half written; only whole lines count.
        text = self.servers.log.read_text(errors="replace")
        records = [
            json.loads(line)
            for line in text.splitlines(keepends=True)
            if line.endswith("\n") and '"event": "ready"' not in line
        ]
        return [record for record in records[since:] if kind is None or record["event"] == kind]

    def mark(self) -> int:
        """Return the number of events so far, to pass to events(since=...) later."""
        return len(self.events())

    def web_events(self, *, since: int = 0) -> list[dict[str, Any]]:
        """Return what the HTTP and TLS servers logged, leaving out the DNS server's events."""
        return [event for event in self.events(since=since) if not event["event"].startswith("dns")]

    def connections(self, role: str, *, since: int = 0) -> list[dict[str, Any]]:
        """Return the TCP connections that the server `role` accepted."""
        return [event for event in self.events("connection", since=since) if event["role"] == role]

    def requests(self, role: str, *, since: int = 0) -> list[dict[str, Any]]:
        """Return the HTTP requests that the server `role` received."""
        return [event for event in self.events("request", since=since) if event["role"] == role]

    def dns_names(self, *, since: int = 0) -> list[str]:
        """Return the names of the DNS queries the fake resolver received, in order."""
        return [event["name"] for event in self.events("dns", since=since)]


@contextlib.contextmanager
def fake_web(workdir: Path) -> Iterator[FakeWeb]:
    """Create the fake web and run its servers; remove all of it on exit.

    Raises FakeNetError when the namespace cannot be created, a route
    does not lead into it, or the servers do not start.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    certificate, key = write_self_signed_certificate(workdir, CERTIFICATE_NAMES)
    with fake_namespace() as created:
        _run_ip(
            "-n",
            created.namespace,
            "addr",
            "add",
            f"{DNS_SERVER}/24",
            "dev",
            created.peer_interface,
        )
        kind, device = route_type(DNS_SERVER)
        if device != created.host_interface:
            raise FakeNetError(
                f"the route to {DNS_SERVER} goes through {device!r} ({kind}), not the fake "
                f"web's veth {created.host_interface!r}"
            )
        command = [
            "ip",
            "netns",
            "exec",
            created.namespace,
            sys.executable,
            "-I",
            str(SERVERS_SCRIPT),
            f"--log={workdir / 'fakeweb.jsonl'}",
            f"--http={PUBLIC_WEB}={PUBLIC_HOST}",
            f"--http={LINK_LOCAL_WEB}={LINK_LOCAL_HOST}",
            f"--https={PUBLIC_TLS}={PUBLIC_HOST}",
            f"--dns={DNS_SERVER}",
            f"--cert={certificate}",
            f"--key={key}",
            f"--redirect-to={REDIRECT_TARGET}",
        ]
        servers = ListenerProcess(command, log=workdir / "fakeweb.jsonl", role="fake-web")
        try:
            servers.wait_ready()
            yield FakeWeb(namespace=created.namespace, certificate=certificate, servers=servers)
        finally:
            servers.stop()


def write_self_signed_certificate(directory: Path, names: tuple[str, ...]) -> tuple[Path, Path]:
    """Write a self-signed P-256 certificate for `names` and its key; return both paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    certificate_path = directory / "fakeweb-cert.pem"
    key_path = directory / "fakeweb-key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return certificate_path, key_path


def client_hello(server_name: str | None, *, tls12_only: bool = False) -> bytes:
    """Return the first flight of a TLS client: a ClientHello with `server_name` as its SNI.

    None sends no server name extension. `tls12_only` offers TLS 1.2 at most, whose server
    sends its certificate in plain text, so a test can see whose certificate came back.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


def certificate_der(path: Path) -> bytes:
    """Return the DER bytes of the PEM certificate at `path`."""
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return certificate.public_bytes(serialization.Encoding.DER)


def _run_ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise FakeNetError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
