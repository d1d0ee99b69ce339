"""End to end through the filtering proxy: a real agent, netguard's redirect, the real proxy.

A busybox probe agent started through the gateway makes requests as any agent would. It
resolves names through the sandbox gateway, which netguard redirects to the proxy's DNS
filter. It connects to ports 80 and 443 of any address, which netguard redirects to the
transparent mode, or to the explicit proxy. The proxy runs as its own user, confined by
nftables to loopback, the sandbox subnet and the fake hosts, and resolves names through the
fake web's DNS server. Each case checks three witnesses: what the agent got back, what the
fake web's servers and DNS server logged (including what never arrived), and the proxy's
audit events with their reason codes.

Proxy flags under test: --allowed-domains=allowed.test,*.allowed.test and
--blocked-domains=blocked.allowed.test, with small body and head limits. The rate limit case
restarts the proxy with a small request limit and restores it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from libs.common.settings import CommonSettings, load_settings
from libs.common.store import connect_redis
from services.proxy.limits import KEY_PREFIX
from tests.integration.conftest import Tarball, make_tarball, trusted_sources
from tests.support.fakenet import HOST_ADDRESS
from tests.support.fakeweb import (
    DNS_SERVER,
    LINK_LOCAL_HOST,
    LINK_LOCAL_WEB,
    PUBLIC_HOST,
    PUBLIC_TLS,
    PUBLIC_WEB,
    FakeWeb,
    certificate_der,
    client_hello,
    fake_web,
)
from tests.support.probe import (
    PROBE_TIMEOUT_SECONDS,
    ProbeAgent,
    ProbeResult,
    build_probe_image,
    dns_query,
    http_probe,
    shell_bytes,
    start_probe_agent,
    tcp_probe,
)
from tests.support.stack import PROXY_UID, FileServer, Stack, running_stack

pytestmark = pytest.mark.integration

NETWORK = "agent-runner-proxy-e2e"
SUBNET = "172.29.8.0/24"
BRIDGE = "ar-px0"
GATEWAY = "172.29.8.1"
EXPLICIT_PORT = 15080
BODY_LIMIT = 65536
HEADER_LIMIT = 4096
FLOOD_LIMIT = 5
FLOOD_TRIES = FLOOD_LIMIT + 3
REBIND_TRIES = 50
LONG_LABEL = "a" * 64
PROXY_ARGS = [
    f"--upstream-dns={DNS_SERVER}",
    "--allowed-domains=allowed.test,*.allowed.test",
    "--blocked-domains=blocked.allowed.test",
    f"--max-request-body-bytes={BODY_LIMIT}",
    f"--max-request-header-bytes={HEADER_LIMIT}",
]
PROXY_EVENT_TYPES = ("proxy.request", "proxy.dns_query")
AUDIT_WAIT_SECONDS = 15.0
# Separates the outputs of the commands of one shell loop.
END_MARKER = "@@end-of-try@@"
CRLF = b"\r\n"


@pytest.fixture(scope="module")
def probe_tarball(docker_client: docker.DockerClient, served: FileServer) -> Iterator[Tarball]:
    image_id = build_probe_image(docker_client)
    yield make_tarball(docker_client, served, image_id, "proxy-e2e-probe.tar")
    with contextlib.suppress(docker.errors.NotFound):
        docker_client.images.remove(image_id, force=True)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeWeb]:
    with fake_web(tmp_path_factory.mktemp("fakeweb")) as running:
        yield running


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, web: FakeWeb, served: FileServer
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("proxy-e2e"),
        supervisor_args=trusted_sources(served.url("")),
        network=NETWORK,
        subnet=SUBNET,
        bridge=BRIDGE,
        proxy=True,
        proxy_args=PROXY_ARGS,
    ) as running:
        try:
            yield running
        finally:
            _delete_counters(running.host_id)


@pytest.fixture(scope="module")
def agent(
    stack: Stack, probe_tarball: Tarball, docker_client: docker.DockerClient
) -> Iterator[ProbeAgent]:
    with httpx.Client(base_url=stack.api_url, headers=stack.headers, timeout=60) as api:
        started = start_probe_agent(
            api,
            docker_client,
            image_url=probe_tarball.url,
            image_digest=probe_tarball.digest,
            network=NETWORK,
        )
        yield started
        api.delete(f"/v1/agents/{started.agent_id}")


def _delete_counters(host_id: str) -> None:
    """Delete the proxy's rate and byte counters of this stack's host from Redis."""

    async def delete() -> None:
        client = connect_redis(load_settings(CommonSettings, ["--host-id", host_id]))
        try:
            keys = [key async for key in client.scan_iter(match=f"{KEY_PREFIX}{host_id}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    asyncio.run(delete())


# Requests the agent sends


def raw_http(
    agent: ProbeAgent,
    host: str,
    path: str,
    *,
    address: str = PUBLIC_HOST,
    port: int = 80,
) -> ProbeResult:
    """Send one GET with Host `host` to address:port from the agent; return the response."""
    return agent.run(exchange(address, port, http_request(host, path)))


def http_request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def exchange(address: str, port: int, payload: bytes | str, *, seconds: int = 3) -> str:
    """Return a command that sends `payload` over TCP and prints the reply until it closes.

    `payload` is raw bytes, or a shell command whose output is sent. nc runs the sending
    shell on the connected socket, so the request is not followed by a FIN: mitmproxy takes
    a client that half-closes as gone and sends it no response. The sender runs in the
    background, so the reply is read even while a large request is still being sent.
    """
    sender = f"printf {shell_bytes(payload)}" if isinstance(payload, bytes) else payload
    script = f"{{ {sender}; }} & cat >&2"
    return f"timeout {seconds} nc {address} {port} -e sh -c {shlex.quote(script)}"


def status_of(response: str) -> int | None:
    """Return the status code of the first HTTP response in `response`, or None."""
    match = re.match(r"HTTP/1\.[01] (\d{3}) ", response)
    return int(match.group(1)) if match else None


def header_of(response: str, name: str) -> str | None:
    """Return the value of header `name` in the first HTTP response head in `response`."""
    head = response.split("\r\n\r\n", 1)[0]
    for line in head.split("\r\n")[1:]:
        field, _, value = line.partition(":")
        if field.strip().lower() == name.lower():
            return value.strip()
    return None


def shell_loop(count: int, body: str) -> str:
    """Return a shell loop that runs `body` `count` times, ending each output with a marker.

    The marker goes to standard error, where exchange() prints replies: docker exec delivers
    the two streams separately, so only lines on the same stream keep their order.
    """
    marker = f"echo >&2; echo {END_MARKER} >&2"
    return f"i=0; while [ $i -lt {count} ]; do i=$((i+1)); {body}; {marker}; done"


def tls_probe(address: str, port: int, payload: bytes, *, seconds: int = 2) -> str:
    """Return a command that sends raw bytes (a ClientHello) and prints what comes back."""
    return f"printf {shell_bytes(payload)} | timeout {seconds} nc {address} {port}"


# Audit events


def proxy_events(
    stack: Stack,
    agent_id: str,
    match: Callable[[dict[str, Any]], bool],
    *,
    count: int = 1,
) -> list[dict[str, Any]]:
    """Return the agent's proxy events that `match` accepts, once at least `count` arrived.

    The proxy publishes asynchronously, so the stream is read again until `count` events
    match or AUDIT_WAIT_SECONDS pass; the caller asserts the exact number.
    """
    deadline = time.monotonic() + AUDIT_WAIT_SECONDS
    while True:
        events = [
            event
            for event in stack.audit_events(agent_id)
            if event["type"] in PROXY_EVENT_TYPES and match(event)
        ]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def request_path(path: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event["type"] == "proxy.request" and event["details"]["path"] == path


def dns_name(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event["type"] == "proxy.dns_query" and event["details"]["host"] == name


def tls_host(host: str | None, reason: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: (
        event["details"]["protocol"] == "tls"
        and event["details"]["host"] == host
        and event["reason_code"] == reason
    )


def assert_denied(event: dict[str, Any], reason: str, *, status: int | None) -> None:
    assert event["reason_code"] == reason, event
    assert event["outcome"] == "denied", event
    assert event["details"]["decision"] == "deny", event
    assert event["details"]["status"] == status, event
    assert event["details"]["upstream"] is None, event
    assert event["details"]["bytes_from_agent"] == 0, event
    assert event["details"]["bytes_to_agent"] == 0, event
    for field in ("mode", "protocol", "duration_ms", "detail"):
        assert event["details"][field] is not None, (field, event)


# HTTP through the transparent mode


def test_allowed_domain_answered_by_public_host(
    agent: ProbeAgent, web: FakeWeb, stack: Stack
) -> None:
    mark = web.mark()

    result = agent.run(http_probe("http://allowed.test/allowed"))

    assert result.exit_code == 0, str(result)
    assert result.text == f"{PUBLIC_WEB} {PUBLIC_HOST}\n"
    requests = web.requests(PUBLIC_WEB, since=mark)
    assert [(r["host"], r["path"], r["peer"]) for r in requests] == [
        ("allowed.test", "/allowed", HOST_ADDRESS)
    ]
    assert web.connections(LINK_LOCAL_WEB, since=mark) == []
    events = proxy_events(stack, agent.agent_id, request_path("/allowed"))
    assert len(events) == 1, events
    event = events[0]
    assert event["reason_code"] == "allowed"
    assert event["outcome"] == "success"
    assert event["details"]["decision"] == "allow"
    assert event["details"]["mode"] == "transparent"
    assert event["details"]["protocol"] == "http"
    assert event["details"]["host"] == "allowed.test"
    assert event["details"]["port"] == 80
    assert event["details"]["method"] == "GET"
    assert event["details"]["status"] == 200
    assert event["details"]["upstream"] == f"{PUBLIC_HOST}:80"
    assert event["details"]["bytes_to_agent"] == len(result.output)
    assert event["details"]["duration_ms"] >= 0
    # The agent's own lookup went through the DNS filter, which allowed it.
    lookups = proxy_events(stack, agent.agent_id, dns_name("allowed.test"))
    assert any(e["reason_code"] == "allowed" and e["details"]["method"] == "A" for e in lookups)


def test_blocked_domain_gets_403(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()

    result = raw_http(agent, "blocked.allowed.test", "/blocked")
    lookup = agent.run(f"timeout {PROBE_TIMEOUT_SECONDS} nslookup blocked.allowed.test")

    assert status_of(result.text) == 403, str(result)
    assert header_of(result.text, "X-Agent-Runner-Reason") == "host_blocked"
    assert '"code": "host_blocked"' in result.text
    assert lookup.exit_code != 0, str(lookup)
    assert "REFUSED" in lookup.text, str(lookup)
    assert web.events("connection", since=mark) == []
    assert web.dns_names(since=mark) == []
    events = proxy_events(stack, agent.agent_id, request_path("/blocked"))
    assert len(events) == 1, events
    assert_denied(events[0], "host_blocked", status=403)
    assert events[0]["details"]["host"] == "blocked.allowed.test"
    queries = proxy_events(stack, agent.agent_id, dns_name("blocked.allowed.test"), count=2)
    assert sorted(e["details"]["method"] for e in queries) == ["A", "AAAA"], queries
    for query in queries:
        assert_denied(query, "host_blocked", status=5)


def test_ip_literal_denied(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()

    fetched = agent.run(http_probe(f"http://{PUBLIC_HOST}/literal-wget"))
    result = raw_http(agent, PUBLIC_HOST, "/literal")

    assert fetched.exit_code != 0, str(fetched)
    assert "403" in fetched.text, str(fetched)
    assert status_of(result.text) == 403, str(result)
    assert header_of(result.text, "X-Agent-Runner-Reason") == "ip_literal_denied"
    assert web.events("connection", since=mark) == []
    for path in ("/literal-wget", "/literal"):
        events = proxy_events(stack, agent.agent_id, request_path(path))
        assert len(events) == 1, events
        assert_denied(events[0], "ip_literal_denied", status=403)
        assert events[0]["details"]["host"] == PUBLIC_HOST


def test_link_local_answer_denied(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()

    lookup = agent.run(f"timeout {PROBE_TIMEOUT_SECONDS} nslookup linklocal.allowed.test")
    result = raw_http(agent, "linklocal.allowed.test", "/linklocal")

    assert "REFUSED" in lookup.text, str(lookup)
    assert LINK_LOCAL_HOST not in lookup.text, str(lookup)
    assert status_of(result.text) == 403, str(result)
    assert header_of(result.text, "X-Agent-Runner-Reason") == "address_link_local"
    # The proxy queried the name to check its answer, but connected to neither address.
    assert "linklocal.allowed.test" in web.dns_names(since=mark)
    assert web.events("connection", since=mark) == []
    queries = proxy_events(stack, agent.agent_id, dns_name("linklocal.allowed.test"), count=2)
    by_type = {e["details"]["method"]: e for e in queries}
    assert len(queries) == 2, queries
    assert_denied(by_type["A"], "address_link_local", status=5)
    # The name has no AAAA records, and an empty answer leads nowhere.
    assert by_type["AAAA"]["reason_code"] == "allowed"
    events = proxy_events(stack, agent.agent_id, request_path("/linklocal"))
    assert len(events) == 1, events
    assert_denied(events[0], "address_link_local", status=403)


def test_rebinding_never_reaches_link_local(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()
    request = exchange(PUBLIC_HOST, 80, http_request("rebind.allowed.test", "/rebind"))

    result = agent.run(shell_loop(REBIND_TRIES, request))

    outputs = result.text.split(END_MARKER)[:-1]
    assert len(outputs) == REBIND_TRIES, str(result)
    statuses = [status_of(output.strip()) for output in outputs]
    succeeded = [output for output, status in zip(outputs, statuses, strict=True) if status == 200]
    assert statuses.count(200) + statuses.count(403) == REBIND_TRIES, statuses
    assert all(f"{PUBLIC_WEB} {PUBLIC_HOST}" in output for output in succeeded)
    assert web.connections(LINK_LOCAL_WEB, since=mark) == []
    answers = [
        event["answer"]
        for event in web.events("dns", since=mark)
        if event["name"] == "rebind.allowed.test" and event["type"] == "A"
    ]
    # The answer alternates with TTL 0, so each try resolved once, and every try that got
    # the public address succeeded while every other was denied.
    assert answers.count([PUBLIC_HOST]) == statuses.count(200), (answers, statuses)
    assert answers.count([LINK_LOCAL_HOST]) == statuses.count(403), (answers, statuses)
    assert statuses.count(200) > 0
    assert statuses.count(403) > 0
    assert len(web.requests(PUBLIC_WEB, since=mark)) == statuses.count(200)
    events = proxy_events(stack, agent.agent_id, request_path("/rebind"), count=REBIND_TRIES)
    reasons = [event["reason_code"] for event in events]
    assert len(events) == REBIND_TRIES, reasons
    assert reasons.count("allowed") == statuses.count(200)
    assert reasons.count("address_link_local") == statuses.count(403)


def test_redirect_to_internal_not_followed(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()

    raw = raw_http(agent, "allowed.test", "/redirect-raw")
    followed = agent.run(http_probe("http://allowed.test/redirect-follow"))

    assert status_of(raw.text) == 302, str(raw)
    assert header_of(raw.text, "Location") == f"http://{LINK_LOCAL_HOST}/"
    assert followed.exit_code != 0, str(followed)
    assert "403" in followed.text, str(followed)
    assert [r["path"] for r in web.requests(PUBLIC_WEB, since=mark)] == [
        "/redirect-raw",
        "/redirect-follow",
    ]
    assert web.connections(LINK_LOCAL_WEB, since=mark) == []
    for path in ("/redirect-raw", "/redirect-follow"):
        events = proxy_events(stack, agent.agent_id, request_path(path))
        assert len(events) == 1, events
        assert events[0]["reason_code"] == "allowed"
        assert events[0]["details"]["status"] == 302
    follow_ups = proxy_events(
        stack, agent.agent_id, lambda event: event["details"]["host"] == LINK_LOCAL_HOST
    )
    assert len(follow_ups) == 1, follow_ups
    assert_denied(follow_ups[0], "ip_literal_denied", status=403)
    assert follow_ups[0]["details"]["path"] == "/"


def test_half_closed_request_recorded_with_its_reason(
    agent: ProbeAgent, web: FakeWeb, stack: Stack
) -> None:
    mark = web.mark()

    # `printf | nc` sends a FIN right after the request. mitmproxy takes that as a client
    # that left and answers nothing, but the decision must still be recorded as made.
    result = agent.run(
        tcp_probe(PUBLIC_HOST, 80, payload=http_request("blocked.allowed.test", "/half-closed"))
    )

    assert status_of(result.text) in (None, 403), str(result)
    assert web.web_events(since=mark) == []
    events = proxy_events(stack, agent.agent_id, request_path("/half-closed"))
    assert len(events) == 1, events
    assert events[0]["reason_code"] == "host_blocked", events[0]


# TLS


def test_https_passed_through_unread(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()

    fetched = agent.run(
        f"timeout {PROBE_TIMEOUT_SECONDS} wget --no-check-certificate -q -O - "
        "https://allowed.test/tls"
    )
    hello = agent.run(
        tls_probe(PUBLIC_HOST, 443, client_hello("tls12.allowed.test", tls12_only=True))
    )

    assert fetched.exit_code == 0, str(fetched)
    assert fetched.text == f"{PUBLIC_TLS} {PUBLIC_HOST}\n"
    # TLS 1.2 sends the server's certificate in plain text: the agent got the fake web's own
    # certificate, so the proxy relayed the handshake instead of answering it.
    assert certificate_der(web.certificate) in hello.output, str(hello)
    server_names = [event["sni"] for event in web.events("client_hello", since=mark)]
    assert server_names == ["allowed.test", "tls12.allowed.test"]
    assert [r["path"] for r in web.requests(PUBLIC_TLS, since=mark)] == ["/tls"]
    for host in ("allowed.test", "tls12.allowed.test"):
        events = proxy_events(stack, agent.agent_id, tls_host(host, "allowed"))
        assert len(events) == 1, events
        details = events[0]["details"]
        assert details["mode"] == "transparent"
        assert details["port"] == 443
        assert details["upstream"] == f"{PUBLIC_HOST}:443"
        assert details["path"] is None
        assert details["bytes_from_agent"] > 0
        assert details["bytes_to_agent"] > 0


@pytest.mark.parametrize(
    ("server_name", "reason"),
    [(None, "sni_missing"), ("blocked.allowed.test", "host_blocked")],
    ids=["no-sni", "blocked-sni"],
)
def test_tls_denied_by_server_name(
    agent: ProbeAgent, web: FakeWeb, stack: Stack, server_name: str | None, reason: str
) -> None:
    mark = web.mark()

    result = agent.run(tls_probe(PUBLIC_HOST, 443, client_hello(server_name)))

    assert result.output == b"", str(result)
    assert result.exit_code == 0, str(result)
    assert web.web_events(since=mark) == []
    events = proxy_events(stack, agent.agent_id, tls_host(server_name, reason))
    assert len(events) == 1, events
    assert_denied(events[0], reason, status=None)
    assert events[0]["details"]["mode"] == "transparent"


def test_connect_tunnel_with_other_sni_closed(
    agent: ProbeAgent, web: FakeWeb, stack: Stack
) -> None:
    mark = web.mark()
    connect = b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n"

    result = agent.run(exchange(GATEWAY, EXPLICIT_PORT, connect + client_hello("other.test")))

    assert status_of(result.text) == 200, str(result)
    assert result.text.split("\r\n\r\n", 1)[1] == "", str(result)
    assert result.exit_code == 0, str(result)
    assert web.web_events(since=mark) == []
    tunnels = proxy_events(
        stack,
        agent.agent_id,
        lambda event: (
            event["details"]["protocol"] == "connect" and event["details"]["host"] == "allowed.test"
        ),
    )
    assert len(tunnels) == 1, tunnels
    assert tunnels[0]["reason_code"] == "allowed"
    assert tunnels[0]["details"]["mode"] == "explicit"
    assert tunnels[0]["details"]["status"] == 200
    events = proxy_events(stack, agent.agent_id, tls_host("other.test", "host_mismatch"))
    assert len(events) == 1, events
    assert_denied(events[0], "host_mismatch", status=None)
    assert events[0]["details"]["mode"] == "explicit"


# Limits


def chunked_upload(path: str, *, chunks: int, chunk_bytes: int) -> str:
    """Return a command that POSTs `chunks` chunks of zero bytes and prints the response."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    size_line = shell_bytes(f"{chunk_bytes:x}\r\n".encode())
    chunk = f"printf {size_line}; head -c {chunk_bytes} /dev/zero; printf {shell_bytes(CRLF)}"
    body = f"i=0; while [ $i -lt {chunks} ]; do i=$((i+1)); {chunk}; done"
    end = shell_bytes(b"0\r\n\r\n")
    return exchange(PUBLIC_HOST, 80, f"printf {shell_bytes(head)}; {body}; printf {end}")


def test_chunked_upload_within_limit(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()

    result = agent.run(chunked_upload("/echo-length/small", chunks=3, chunk_bytes=1000))

    assert status_of(result.text) == 200, str(result)
    assert result.text.endswith("received 3000 bytes\n"), str(result)
    assert [(r["path"], r["body_bytes"]) for r in web.requests(PUBLIC_WEB, since=mark)] == [
        ("/echo-length/small", 3000)
    ]
    events = proxy_events(stack, agent.agent_id, request_path("/echo-length/small"))
    assert len(events) == 1, events
    assert events[0]["reason_code"] == "allowed"
    assert events[0]["details"]["method"] == "POST"
    assert events[0]["details"]["bytes_from_agent"] == 3000


def test_chunked_upload_over_limit(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()
    chunks = BODY_LIMIT // 4096 + 4

    result = agent.run(chunked_upload("/echo-length/large", chunks=chunks, chunk_bytes=4096))

    assert status_of(result.text) == 413, str(result)
    assert web.events("connection", since=mark) == []
    events = proxy_events(stack, agent.agent_id, request_path("/echo-length/large"))
    assert len(events) == 1, events
    event = events[0]
    assert event["reason_code"] == "body_too_large", event
    assert event["details"]["status"] == 413


def test_request_head_over_limit(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()
    head = b"GET /huge-head HTTP/1.1\r\nHost: allowed.test\r\nX-Padding: "

    padding = f"head -c {HEADER_LIMIT * 2} /dev/zero | tr '\\0' a"

    result = agent.run(exchange(PUBLIC_HOST, 80, f"printf {shell_bytes(head)}; {padding}"))

    assert status_of(result.text) == 431, str(result)
    assert web.events("connection", since=mark) == []
    events = proxy_events(
        stack, agent.agent_id, lambda event: event["reason_code"] == "headers_too_large"
    )
    assert len(events) == 1, events
    assert events[0]["details"]["status"] == 431
    assert events[0]["details"]["mode"] == "transparent"
    assert events[0]["outcome"] == "denied"


# DNS filter


def test_dns_txt_query_refused(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()

    result = agent.run(f"timeout {PROBE_TIMEOUT_SECONDS} nslookup -type=txt txt.allowed.test")

    assert "REFUSED" in result.text, str(result)
    assert web.dns_names(since=mark) == []
    events = proxy_events(stack, agent.agent_id, dns_name("txt.allowed.test"))
    assert len(events) == 1, events
    assert_denied(events[0], "dns_type_refused", status=5)
    assert events[0]["details"]["method"] == "TXT"


def test_dns_denied_name_never_forwarded(agent: ProbeAgent, web: FakeWeb, stack: Stack) -> None:
    mark = web.mark()

    result = agent.run(f"timeout {PROBE_TIMEOUT_SECONDS} nslookup denied.test")

    assert "REFUSED" in result.text, str(result)
    assert web.dns_names(since=mark) == []
    events = proxy_events(stack, agent.agent_id, dns_name("denied.test"), count=2)
    assert sorted(e["details"]["method"] for e in events) == ["A", "AAAA"], events
    for event in events:
        assert_denied(event, "host_not_allowed", status=5)


def long_label_query() -> str:
    """Return a command that sends an A query with a 64-octet label over TCP to the gateway.

    busybox nslookup cannot encode such a label, so the query is built here. TCP port 53 is
    redirected to the DNS filter like UDP.
    """
    query = dns_query(f"{LONG_LABEL}.allowed.test")
    return exchange(GATEWAY, 53, len(query).to_bytes(2, "big") + query)


def test_dns_long_label_dropped(agent: ProbeAgent, web: FakeWeb) -> None:
    mark = web.mark()

    result = agent.run(long_label_query())

    # mitmproxy cannot parse the message, so it closes the connection without any answer.
    assert result.output == b"", str(result)
    assert web.dns_names(since=mark) == []
    assert web.events("dns_invalid", since=mark) == []


def test_dns_long_label_audited(agent: ProbeAgent, stack: Stack) -> None:
    def malformed(count: int) -> list[dict[str, Any]]:
        return proxy_events(
            stack,
            agent.agent_id,
            lambda event: event["reason_code"] == "dns_malformed",
            count=count,
        )

    before = len(malformed(0))
    agent.run(long_label_query())

    events = malformed(before + 1)
    assert len(events) == before + 1, events
    assert events[-1]["type"] == "proxy.dns_query"
    assert events[-1]["outcome"] == "denied"


# TLS inspection: restarts the proxy with --tls-inspection


@pytest.fixture
def inspecting_proxy(stack: Stack, web: FakeWeb) -> Iterator[None]:
    """Restart the proxy with TLS inspection, trusting the fake web's certificate upstream.

    The certificate is copied where the proxy's own user can read it.
    """
    folder = Path(tempfile.mkdtemp(prefix="proxy-upstream-ca-"))
    trusted = folder / "upstream-ca.pem"
    shutil.copyfile(web.certificate, trusted)
    for path in (folder, trusted):
        os.chown(path, PROXY_UID, PROXY_UID)
    stack.stop_service("proxy")
    try:
        stack.start_proxy(extra=["--tls-inspection", f"--upstream-ca-file={trusted}"])
        yield
    finally:
        if "proxy" in stack.processes:
            stack.stop_service("proxy")
        stack.start_proxy()
        shutil.rmtree(folder, ignore_errors=True)


def curl_via_public_host(url: str, *options: str) -> str:
    """Return a curl command for `url` that connects to the public fake host without DNS.

    busybox's TLS client offers no signature algorithms, which the proxy's OpenSSL refuses
    when it terminates TLS, so these tests run the curl that the probe image carries. It
    does not check the proxy's certificate; the test is about what the proxy decides.
    """
    return shlex.join(
        [
            "timeout",
            str(PROBE_TIMEOUT_SECONDS + 2),
            "curl",
            "--silent",
            "--insecure",
            "--max-time",
            str(PROBE_TIMEOUT_SECONDS),
            "--resolve",
            f"allowed.test:443:{PUBLIC_HOST}",
            "--write-out",
            "%{http_code} ",
            *options,
            url,
        ]
    )


def test_inspection_decrypts_and_checks_each_request(
    agent: ProbeAgent, web: FakeWeb, stack: Stack, inspecting_proxy: None
) -> None:
    mark = web.mark()

    fetched = agent.run(curl_via_public_host("https://allowed.test/inspected?token=secret"))

    assert fetched.exit_code == 0, str(fetched)
    assert fetched.text == f"{PUBLIC_TLS} {PUBLIC_HOST}\n200 "
    assert [r["path"] for r in web.requests(PUBLIC_TLS, since=mark)] == ["/inspected?token=secret"]
    # Only a proxy that decrypted the request can record its method and path.
    [event] = proxy_events(stack, agent.agent_id, request_path("/inspected"))
    assert event["reason_code"] == "allowed"
    assert event["details"]["protocol"] == "https"
    assert event["details"]["method"] == "GET"
    assert event["details"]["status"] == 200


def test_inspection_rejects_host_other_than_sni(
    agent: ProbeAgent, web: FakeWeb, stack: Stack, inspecting_proxy: None
) -> None:
    mark = web.mark()

    fetched = agent.run(
        curl_via_public_host(
            "https://allowed.test/smuggled", "--header", "Host: other.allowed.test"
        )
    )

    assert fetched.text.endswith("403 "), str(fetched)
    assert '"code": "host_mismatch"' in fetched.text, str(fetched)
    assert web.requests(PUBLIC_TLS, since=mark) == []
    [event] = proxy_events(stack, agent.agent_id, request_path("/smuggled"))
    assert_denied(event, "host_mismatch", status=403)


# Rate limit, last: it restarts the proxy


@pytest.fixture
def flood_proxy(stack: Stack) -> Iterator[None]:
    """Restart the proxy with a small request limit, and with the module's flags afterwards.

    The window differs from the default one, so the agent's earlier requests fall in another
    counter and the limit counts from zero. NOTE: a window boundary during the flood (about
    0.2 s of every 3600 s) would restart the count and fail the test.
    """
    stack.stop_service("proxy")
    try:
        stack.start_proxy(
            extra=[f"--max-requests-per-window={FLOOD_LIMIT}", "--rate-window-seconds=3600"]
        )
        yield
    finally:
        if "proxy" in stack.processes:
            stack.stop_service("proxy")
        stack.start_proxy()


def test_request_flood_rate_limited(
    agent: ProbeAgent, web: FakeWeb, stack: Stack, flood_proxy: None
) -> None:
    mark = web.mark()
    request = exchange(PUBLIC_HOST, 80, http_request("allowed.test", "/flood"))

    result = agent.run(shell_loop(FLOOD_TRIES, request))

    outputs = result.text.split(END_MARKER)[:-1]
    statuses = [status_of(output.strip()) for output in outputs]
    assert statuses == [200] * FLOOD_LIMIT + [429] * (FLOOD_TRIES - FLOOD_LIMIT), str(result)
    for output in outputs[FLOOD_LIMIT:]:
        assert header_of(output.strip(), "X-Agent-Runner-Reason") == "rate_limited"
        assert header_of(output.strip(), "Retry-After") is not None
    assert len(web.requests(PUBLIC_WEB, since=mark)) == FLOOD_LIMIT
    events = proxy_events(stack, agent.agent_id, request_path("/flood"), count=FLOOD_TRIES)
    reasons = [event["reason_code"] for event in events]
    assert reasons.count("allowed") == FLOOD_LIMIT, reasons
    assert reasons.count("rate_limited") == FLOOD_TRIES - FLOOD_LIMIT, reasons
    for event in events:
        if event["reason_code"] == "rate_limited":
            assert_denied(event, "rate_limited", status=429)
