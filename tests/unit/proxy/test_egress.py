"""Unit tests of the egress filter's decisions with mitmproxy's test flows and fake lookups.

Redis, the resolver and the audit stream are replaced by small fakes so that each rule of the
filter can be checked alone. The integration tests run the same code against the real ones.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from mitmproxy import connection, http
from mitmproxy import flow as mflow
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import tflow

from libs.common.decisions import Decision, Reason
from libs.common.errors import StoreError
from libs.common.messages import AgentNetworkPolicy
from libs.common.settings import load_settings
from services.proxy.egress import EgressFilter
from services.proxy.limits import Admission
from services.proxy.resolver import Answer
from services.proxy.settings import ProxySettings

AGENT_ADDRESS = "172.30.0.2"
AGENT_ID = "ag-" + "1" * 32


class Audit:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event_type: str, **fields: Any) -> None:
        self.events.append({"type": event_type, **fields})


class Registry:
    def __init__(self, policies: dict[str, AgentNetworkPolicy], *, broken: bool = False) -> None:
        self.policies = policies
        self.broken = broken

    async def get(self, address: str) -> AgentNetworkPolicy | None:
        if self.broken:
            raise StoreError("redis is down")
        return self.policies.get(address)


class Resolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.queries: list[str] = []

    async def resolve_all(self, name: str) -> Answer:
        self.queries.append(name)
        addresses: tuple[IPv4Address | IPv6Address, ...] = tuple(
            ip_address(item) for item in self.answers.get(name, [])
        )
        return Answer(addresses=addresses, ttl=0)


class Limiter:
    def __init__(self, *, deny: Reason | None = None) -> None:
        self.deny = deny
        self.admitted = 0

    async def admit_request(self, agent_id: str) -> Admission:
        self.admitted += 1
        if self.deny is not None:
            return Admission(decision=Decision.deny(self.deny, "limit"), retry_after=7.2)
        return Admission(decision=Decision.allow("ok"), retry_after=7.2)

    async def add_bytes(self, agent_id: str, count: int) -> None:
        pass


def make_filter(
    *,
    registry: Registry | None = None,
    limiter: Limiter | None = None,
    answers: dict[str, list[str]] | None = None,
) -> tuple[EgressFilter, Audit, Resolver]:
    settings = load_settings(
        ProxySettings, ["--allowed-domains=allowed.test,*.allowed.test", "--upstream-dns=127.0.0.1"]
    )
    audit = Audit()
    resolver = Resolver(
        answers
        if answers is not None
        else {"allowed.test": ["198.51.100.10"], "inner.allowed.test": ["169.254.42.42"]}
    )
    policy = AgentNetworkPolicy(agent_id=AGENT_ID, address=AGENT_ADDRESS)
    egress = EgressFilter(
        settings,
        audit=audit,  # type: ignore[arg-type]
        registry=registry or Registry({AGENT_ADDRESS: policy}),  # type: ignore[arg-type]
        resolver=resolver,  # type: ignore[arg-type]
        limiter=limiter or Limiter(),  # type: ignore[arg-type]
        dns_limiter=Limiter(),  # type: ignore[arg-type]
    )
    return egress, audit, resolver


def client(mode: str = "transparent", address: str = AGENT_ADDRESS) -> connection.Client:
    conn = tflow.tclient_conn()
    conn.peername = (address, 40000)
    conn.proxy_mode = mode_specs.ProxyMode.parse(mode)
    return conn


async def connected(egress: EgressFilter, mode: str = "transparent") -> connection.Client:
    conn = client(mode)
    await egress.client_connected(conn)
    return conn


def http_flow(conn: connection.Client, host_header: str, *, host: str = "198.51.100.99") -> Any:
    flow = tflow.tflow(client_conn=conn)
    flow.request.host = host
    flow.request.port = 80
    flow.request.headers["Host"] = host_header
    return flow


def gate(egress: EgressFilter, conn: connection.Client, address: tuple[str, int]) -> str | None:
    server = tflow.tserver_conn()
    server.address = address
    server.error = None
    egress.server_connect(ServerConnectionHookData(client=conn, server=server))
    return server.error


async def test_unknown_source_closed_and_audited() -> None:
    egress, audit, _ = make_filter(registry=Registry({}))
    conn = client()

    await egress.client_connected(conn)

    assert conn.error is not None
    assert audit.events[0]["reason_code"] == "unknown_agent"
    assert egress.states == {}


async def test_registry_failure_closes_connection() -> None:
    egress, audit, _ = make_filter(registry=Registry({}, broken=True))
    conn = client()

    await egress.client_connected(conn)

    assert conn.error is not None
    assert audit.events[0]["reason_code"] == "limiter_unavailable"


async def test_allowed_request_pinned_to_checked_address() -> None:
    egress, _audit, _ = make_filter()
    conn = await connected(egress)
    flow = http_flow(conn, "Allowed.Test.")

    await egress.requestheaders(flow)

    assert flow.response is None
    assert flow.request.host == "198.51.100.10"
    assert flow.request.headers["Host"] == "Allowed.Test."
    assert gate(egress, conn, ("198.51.100.10", 80)) is None


async def test_gate_refuses_unapproved_address() -> None:
    egress, _, _ = make_filter()
    conn = await connected(egress)
    await egress.requestheaders(http_flow(conn, "allowed.test"))

    assert gate(egress, conn, ("198.51.100.11", 80)) is not None
    assert gate(egress, conn, ("198.51.100.10", 443)) is not None


async def test_gate_refuses_other_clients() -> None:
    egress, _, _ = make_filter()
    conn = await connected(egress)
    await egress.requestheaders(http_flow(conn, "allowed.test"))
    other = await connected(egress)

    assert gate(egress, other, ("198.51.100.10", 80)) is not None


async def test_gate_refuses_when_check_fails() -> None:
    egress, _, _ = make_filter()
    conn = await connected(egress)
    egress.states[conn.id].approved = None  # type: ignore[assignment]

    assert gate(egress, conn, ("198.51.100.10", 80)) is not None


@pytest.mark.parametrize(
    ("host", "reason", "status"),
    [
        pytest.param("denied.test", "host_not_allowed", 403, id="not-allowed"),
        pytest.param("198.51.100.10", "ip_literal_denied", 403, id="ip-literal"),
        pytest.param("0x7f.1", "ip_literal_denied", 403, id="hex-literal"),
        pytest.param("inner.allowed.test", "address_link_local", 403, id="link-local-answer"),
        pytest.param("empty.allowed.test", "no_addresses", 403, id="no-addresses"),
        pytest.param("allowed.test:22", "port_not_allowed", 403, id="port"),
    ],
)
async def test_denied_requests(host: str, reason: str, status: int) -> None:
    egress, audit, _ = make_filter()
    conn = await connected(egress, "regular")
    flow = http_flow(conn, host, host=host.split(":", maxsplit=1)[0])
    if ":" in host:
        flow.request.port = int(host.split(":")[1])

    await egress.requestheaders(flow)

    assert flow.response is not None
    assert flow.response.status_code == status
    assert flow.response.headers["X-Agent-Runner-Reason"] == reason
    assert audit.events[-1]["reason_code"] == reason
    assert egress.states[conn.id].approved == set()


async def test_host_header_must_match_url_in_explicit_mode() -> None:
    egress, _audit, resolver = make_filter()
    conn = await connected(egress, "regular")
    flow = http_flow(conn, "evil.test", host="allowed.test")

    await egress.requestheaders(flow)

    assert flow.response is not None
    assert flow.response.headers["X-Agent-Runner-Reason"] == "host_mismatch"
    assert resolver.queries == []


async def test_missing_host_header_denied() -> None:
    egress, _, _ = make_filter()
    conn = await connected(egress)
    flow = http_flow(conn, "allowed.test")
    del flow.request.headers["Host"]

    await egress.requestheaders(flow)

    assert flow.response is not None
    assert flow.response.headers["X-Agent-Runner-Reason"] == "host_invalid"


async def test_rate_limit_is_429_with_retry_after() -> None:
    egress, _, resolver = make_filter(limiter=Limiter(deny=Reason.RATE_LIMITED))
    conn = await connected(egress)
    flow = http_flow(conn, "allowed.test")

    await egress.requestheaders(flow)

    assert flow.response is not None
    assert flow.response.status_code == 429
    assert flow.response.headers["Retry-After"] == "7"
    assert resolver.queries == []


async def test_oversized_head_is_431() -> None:
    egress, _, _ = make_filter()
    conn = await connected(egress)
    flow = http_flow(conn, "allowed.test")
    flow.request.headers["X-Padding"] = "a" * 40_000

    await egress.requestheaders(flow)

    assert flow.response is not None
    assert flow.response.status_code == 431


async def test_connect_then_matching_host_reuses_the_pinned_target() -> None:
    egress, _audit, resolver = make_filter()
    conn = await connected(egress, "regular")
    connect = tflow.tflow(client_conn=conn)
    connect.request.method = "CONNECT"
    connect.request.host, connect.request.port = "allowed.test", 443

    await egress.http_connect(connect)
    inner = http_flow(conn, "allowed.test")
    await egress.requestheaders(inner)
    mismatched = http_flow(conn, "other.allowed.test")
    await egress.requestheaders(mismatched)

    assert connect.response is None
    assert connect.request.host == "198.51.100.10"
    assert inner.response is None
    assert resolver.queries == ["allowed.test"]
    assert mismatched.response is not None
    assert mismatched.response.headers["X-Agent-Runner-Reason"] == "host_mismatch"


async def test_denied_connect_is_403() -> None:
    egress, audit, _ = make_filter()
    conn = await connected(egress, "regular")
    connect = tflow.tflow(client_conn=conn)
    connect.request.method = "CONNECT"
    connect.request.host, connect.request.port = "denied.test", 443

    await egress.http_connect(connect)

    assert connect.response is not None
    assert connect.response.status_code == 403
    assert audit.events[-1]["details"]["method"] == "CONNECT"


async def test_open_records_closed_on_disconnect() -> None:
    egress, audit, _ = make_filter()
    conn = await connected(egress)
    await egress.requestheaders(http_flow(conn, "allowed.test"))
    assert audit.events == []

    egress.client_disconnected(conn)

    assert [event["reason_code"] for event in audit.events] == ["allowed"]
    assert egress.states == {}


@pytest.mark.parametrize(
    ("host", "reason"),
    [("allowed.test", "allowed"), ("inner.allowed.test", "address_link_local")],
)
async def test_client_leaving_mid_decision_keeps_reason(host: str, reason: str) -> None:
    egress, audit, resolver = make_filter()
    conn = await connected(egress)
    resolve_all = resolver.resolve_all

    async def leave_then_resolve(name: str) -> Answer:
        # The client closes while the filter waits for DNS, as a half-closing client does.
        egress.client_disconnected(conn)
        return await resolve_all(name)

    resolver.resolve_all = leave_then_resolve  # type: ignore[method-assign]

    await egress.requestheaders(http_flow(conn, host))

    assert [event["reason_code"] for event in audit.events] == [reason]
    assert gate(egress, conn, ("198.51.100.10", 80)) is not None


async def test_absolute_target_must_match_host_in_transparent_mode() -> None:
    egress, _, resolver = make_filter()
    conn = await connected(egress)
    flow = http_flow(conn, "allowed.test")
    flow.request.authority = "evil.test"

    await egress.requestheaders(flow)

    assert flow.response is not None
    assert flow.response.headers["X-Agent-Runner-Reason"] == "host_mismatch"
    assert resolver.queries == []


async def test_client_hanging_up_keeps_upstream_status() -> None:
    egress, audit, _ = make_filter()
    conn = await connected(egress)
    flow = http_flow(conn, "allowed.test")
    await egress.requestheaders(flow)
    flow.response = http.Response.make(302, b"", {"Location": "http://169.254.42.42/"})
    flow.error = mflow.Error("Client disconnected.")

    await egress.error(flow)

    [event] = audit.events
    assert event["reason_code"] == "allowed"
    assert event["details"]["status"] == 302
