"""The mitmproxy addon that decides, pins, limits and records every request an agent makes.

Each client connection is mapped to an agent by its source address, using the policies that
the supervisor registers and netguard keeps in Redis. A connection from an unknown source is
closed at once. For every HTTP request, CONNECT and TLS connection the addon:

1. takes the host the agent named (Host, the absolute URL, CONNECT or the TLS server name) and
   requires the names of one exchange to agree;
2. checks it against the agent's domain policy and the allowed ports;
3. counts it against the agent's rate limit;
4. resolves the name itself, once, checks every address of the answer, and rewrites the
   upstream to one of those addresses; the agent's own destination address is never used;
5. approves exactly that address for this client.

`server_connect` is the last gate: mitmproxy opens no upstream connection to an address the
addon did not approve for that client, whatever path led there, so a hook that errs or a
mitmproxy layer that connects on its own fails closed. TLS is passed through unread unless
`--tls-inspection` is on. Every decision ends in one audit event and one log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import dns.rdatatype
from mitmproxy import connection, http, tcp
from mitmproxy import dns as mdns
from mitmproxy.addons.next_layer import NextLayer
from mitmproxy.net.dns import response_codes
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, layer, layers
from mitmproxy.proxy import mode_specs as specs
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from libs.common import logs
from libs.common.audit import AuditPublisher
from libs.common.decisions import Decision, Reason
from libs.common.errors import StoreError
from libs.common.hosts import HostInvalid, normalize_host, parse_ip_literal
from libs.common.messages import AgentNetworkPolicy
from libs.common.registry import AgentRegistry
from services.proxy.dns_checks import check_query, normalized_query_name
from services.proxy.limits import Limiter
from services.proxy.policy import DomainPolicy
from services.proxy.records import DecisionRecord
from services.proxy.resolver import ResolutionError, Resolver
from services.proxy.settings import ProxySettings

logger = logging.getLogger(__name__)

STATUS_BY_REASON = {
    Reason.RATE_LIMITED: 429,
    Reason.BANDWIDTH_EXCEEDED: 429,
    Reason.BODY_TOO_LARGE: 413,
    Reason.HEADERS_TOO_LARGE: 431,
    Reason.RESOLUTION_FAILED: 502,
    Reason.LIMITER_UNAVAILABLE: 503,
}
REASON_HEADER = "X-Agent-Runner-Reason"
# mitmproxy's own error text when a request body passes body_size_limit.
_BODY_LIMIT_ERROR = "body exceeds mitmproxy's body_size_limit"
# Compiled domain policies kept per distinct agent allowlist; agents come and go.
_MAX_POLICIES = 1024
# The decision of a record whose hook is still deciding. The client may disconnect meanwhile,
# so client_disconnected leaves such a record to the hook, which finishes it with the real one.
_PENDING = Decision.deny(Reason.UNKNOWN_AGENT, "no agent for this connection")


class _CloseClient(layer.Layer):
    """A layer that closes the client connection as soon as it starts, for a denied handshake."""

    def _handle_event(self, event: Any) -> layer.CommandGenerator[None]:
        yield commands.CloseConnection(self.context.client)


@dataclass(frozen=True)
class Target:
    """An allowed destination: the normalised name and the checked address to connect to."""

    host: str
    address: IPv4Address | IPv6Address
    port: int


@dataclass
class ClientState:
    """State of one client connection: its agent, policy, approved upstreams and records."""

    client: str
    mode: str
    agent: AgentNetworkPolicy
    policy: DomainPolicy
    approved: set[tuple[str, int]] = field(default_factory=set)
    connect: Target | None = None
    # The target a decrypted TLS connection was pinned to; its requests reuse it.
    tls_target: Target | None = None
    records: list[DecisionRecord] = field(default_factory=list)


class Denied(Exception):
    """A decision that ends the exchange; `decision.reason` is never `allowed`."""

    def __init__(self, decision: Decision, retry_after: float | None = None) -> None:
        super().__init__(decision.detail)
        self.decision = decision
        self.retry_after = retry_after


def _mode_name(mode: specs.ProxyMode) -> str:
    if isinstance(mode, specs.TransparentMode):
        return "transparent"
    if isinstance(mode, specs.DnsMode):
        return "dns"
    return "explicit"


def _peer(conn: connection.Connection) -> str:
    address = conn.peername
    return f"{address[0]}:{address[1]}" if address else "unknown"


class EgressFilter(NextLayer):
    """Decide every exchange of every agent; see the module docstring for the order."""

    def __init__(
        self,
        settings: ProxySettings,
        *,
        audit: AuditPublisher,
        registry: AgentRegistry,
        resolver: Resolver,
        limiter: Limiter,
        dns_limiter: Limiter,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.audit = audit
        self.registry = registry
        self.resolver = resolver
        self.limiter = limiter
        self.dns_limiter = dns_limiter
        self.states: dict[str, ClientState] = {}
        self._policies: dict[tuple[str, ...], DomainPolicy] = {}
        self._allowed_ports = frozenset(settings.allowed_ports)
        self._tls_records: dict[str, DecisionRecord] = {}

    # Agents and connections

    def _policy_for(self, agent: AgentNetworkPolicy) -> DomainPolicy:
        key = tuple(agent.allowed_domains)
        policy = self._policies.get(key)
        if policy is None:
            if len(self._policies) >= _MAX_POLICIES:
                self._policies.pop(next(iter(self._policies)))
            try:
                policy = DomainPolicy(
                    allowed=(*self.settings.allowed_domains, *agent.allowed_domains),
                    blocked=tuple(self.settings.blocked_domains),
                    allow_ip_literals=tuple(self.settings.allow_ip_literals),
                )
            except ValueError as exc:
                # The gateway validates agents' lists, but a start request may come over NATS
                # from elsewhere. An empty policy denies every host.
                logger.error(
                    "the allowlist of agent %s is invalid, so it may reach nothing: %s",
                    agent.agent_id,
                    exc,
                    extra={logs.AGENT_ID: agent.agent_id},
                )
                return DomainPolicy()
            self._policies[key] = policy
        return policy

    def _record(
        self,
        *,
        client: connection.Client,
        state: ClientState | None,
        protocol: str,
        decision: Decision,
        event_type: str = "proxy.request",
    ) -> DecisionRecord:
        record = DecisionRecord(
            audit=self.audit,
            event_type=event_type,
            agent_id=state.agent.agent_id if state else None,
            mode=state.mode if state else _mode_name(client.proxy_mode),
            protocol=protocol,
            client=_peer(client),
            decision=decision,
        )
        if state is not None:
            state.records.append(record)
            # Keep-alive connections make many records; only open ones are worth keeping.
            if len(state.records) > 64:
                state.records = [item for item in state.records if not item.finished]
        return record

    async def client_connected(self, client: connection.Client) -> None:
        """Map the connection to an agent by source address, or close it."""
        address = client.peername[0] if client.peername else ""
        try:
            agent = await self.registry.get(address)
        except StoreError as exc:
            logger.error("cannot look up the agent at %s: %s", address, exc)
            agent = None
            decision = Decision.deny(Reason.LIMITER_UNAVAILABLE, f"agent lookup failed: {exc}")
        else:
            decision = Decision.deny(
                Reason.UNKNOWN_AGENT, f"no agent is registered at source address {address}"
            )
        if agent is None:
            client.error = decision.detail
            protocol = "dns" if isinstance(client.proxy_mode, specs.DnsMode) else "tcp"
            self._record(client=client, state=None, protocol=protocol, decision=decision).finish()
            return
        self.states[client.id] = ClientState(
            client=_peer(client),
            mode=_mode_name(client.proxy_mode),
            agent=agent,
            policy=self._policy_for(agent),
        )

    def client_disconnected(self, client: connection.Client) -> None:
        """Close the records of the connection that are still open."""
        state = self.states.pop(client.id, None)
        if state is None:
            return
        for record in state.records:
            if record.decision is not _PENDING:
                record.finish()

    def server_connect(self, data: ServerConnectionHookData) -> None:
        """Refuse every upstream connection to an address not approved for this client."""
        try:
            state = self.states.get(data.client.id)
            address = data.server.address
            key = (str(address[0]), int(address[1])) if address else None
            if state is not None and key is not None and key in state.approved:
                return
            problem = f"upstream {address} was not approved for client {_peer(data.client)}"
        except Exception as exc:  # any failure of the check must refuse, never allow
            problem = f"upstream check failed: {exc!r}"
            state = None
        data.server.error = problem
        logger.error(
            "rejected an upstream connection: %s",
            problem,
            extra={logs.AGENT_ID: state.agent.agent_id if state else None},
        )

    # Shared decision steps

    async def _admit(self, state: ClientState, limiter: Limiter) -> None:
        try:
            result = await limiter.admit_request(state.agent.agent_id)
        except StoreError as exc:
            raise Denied(
                Decision.deny(Reason.LIMITER_UNAVAILABLE, f"rate limiter unavailable: {exc}")
            ) from exc
        if not result.decision.allowed:
            raise Denied(result.decision, retry_after=result.retry_after)

    def _check_port(self, port: int) -> None:
        if port not in self._allowed_ports:
            raise Denied(
                Decision.deny(
                    Reason.PORT_NOT_ALLOWED,
                    f"port {port} is not in --allowed-ports {sorted(self._allowed_ports)}",
                )
            )

    async def _resolve(self, state: ClientState, raw_host: str, port: int) -> Target:
        """Check `raw_host` and `port` against the policy and return the pinned target."""
        self._check_port(port)
        decision = state.policy.decide(raw_host)
        if not decision.allowed:
            raise Denied(decision)
        host = normalize_host(raw_host)
        literal = parse_ip_literal(host)
        if literal is not None:
            return Target(host=host, address=literal, port=port)
        try:
            answer = await self.resolver.resolve_all(host)
        except ResolutionError as exc:
            raise Denied(Decision.deny(Reason.RESOLUTION_FAILED, str(exc))) from exc
        checked = state.policy.decide_addresses(answer.addresses)
        if not checked.allowed:
            raise Denied(Decision.deny(checked.reason, f"{host!r}: {checked.detail}"))
        ipv4 = [address for address in answer.addresses if address.version == 4]
        # The sandbox has no IPv6, and the host may not either; prefer IPv4.
        choice = random.choice(ipv4 or list(answer.addresses))  # noqa: S311 - load spreading
        return Target(host=host, address=choice, port=port)

    def _approve(self, state: ClientState, target: Target) -> None:
        state.approved.add((str(target.address), target.port))

    # HTTP

    def _head_size(self, request: http.Request) -> int:
        size = len(request.method) + len(request.path) + 16
        for name, value in request.headers.fields:
            size += len(name) + len(value) + 4
        return size

    def _requested_host(self, flow: http.HTTPFlow, state: ClientState) -> tuple[str, int]:
        request = flow.request
        header = request.host_header
        if state.mode == "explicit" and state.connect is None and not flow.client_conn.tls:
            # Absolute-form request to the explicit proxy: the URL names the host, and a Host
            # header, if any, must name the same one.
            if header is not None and _same_host(header, request.host) is not True:
                raise Denied(
                    Decision.deny(
                        Reason.HOST_MISMATCH,
                        f"Host {header!r} differs from the request URL's host {request.host!r}",
                    )
                )
            return request.host, request.port
        if not header:
            raise Denied(Decision.deny(Reason.HOST_INVALID, "the request has no Host header"))
        # An absolute-form target (or HTTP/2 :authority) must agree with Host, or an upstream
        # that is itself a proxy could be steered by the part the check did not read.
        if request.authority and _same_host(request.authority, header) is not True:
            raise Denied(
                Decision.deny(
                    Reason.HOST_MISMATCH,
                    f"request target authority {request.authority!r} differs from Host {header!r}",
                )
            )
        if state.connect is not None and _same_host(header, state.connect.host) is not True:
            raise Denied(
                Decision.deny(
                    Reason.HOST_MISMATCH,
                    f"Host {header!r} differs from the CONNECT host {state.connect.host!r}",
                )
            )
        sni = flow.client_conn.sni
        if flow.client_conn.tls and (sni is None or _same_host(header, sni) is not True):
            raise Denied(
                Decision.deny(
                    Reason.HOST_MISMATCH,
                    f"Host {header!r} differs from the TLS server name {sni!r}",
                )
            )
        port = state.connect.port if state.connect is not None else request.port
        return header, port

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Decide one HTTP request before its body is read."""
        state = self.states.get(flow.client_conn.id)
        record = self._record(
            client=flow.client_conn,
            state=state,
            protocol="https" if flow.client_conn.tls else "http",
            decision=_PENDING,
        )
        record.method = flow.request.method
        record.set_path(flow.request.path)
        flow.metadata["agent_runner"] = record
        if state is None:
            self._deny(flow, record, record.decision)
            return
        try:
            if self._head_size(flow.request) > self.settings.max_request_header_bytes:
                raise Denied(
                    Decision.deny(
                        Reason.HEADERS_TOO_LARGE,
                        f"request head over --max-request-header-bytes "
                        f"{self.settings.max_request_header_bytes}",
                    )
                )
            raw_host, port = self._requested_host(flow, state)
            record.host, record.port = raw_host, port
            await self._admit(state, self.limiter)
            # Inside a tunnel or a decrypted TLS connection the upstream is already pinned,
            # and _requested_host made sure the request names the same host.
            if state.connect is not None:
                target = state.connect
            elif flow.client_conn.tls and state.tls_target is not None:
                target = state.tls_target
            else:
                target = await self._resolve(state, raw_host, port)
        except Denied as denied:
            self._deny(flow, record, denied.decision, retry_after=denied.retry_after)
            return
        record.host = target.host
        record.upstream = f"{target.address}:{port}"
        record.decision = Decision.allow(f"{target.host!r} via {target.address}")
        if flow.client_conn.id not in self.states:
            record.finish()  # the client left while the request was decided
            return
        self._approve(state, target)
        # Only the pinned address changes; the Host header stays what the agent sent.
        flow.request.data.host = str(target.address)
        flow.request.data.port = port

    def _deny(
        self,
        flow: http.HTTPFlow,
        record: DecisionRecord,
        decision: Decision,
        *,
        retry_after: float | None = None,
    ) -> None:
        status = STATUS_BY_REASON.get(decision.reason, 403)
        headers = {"Content-Type": "application/json", REASON_HEADER: str(decision.reason)}
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, round(retry_after)))
        body = json.dumps(
            {"error": {"code": str(decision.reason), "message": decision.detail}}
        ).encode()
        flow.response = http.Response.make(status, body, headers)
        record.finish(status=status, decision=decision)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream the response to the agent, counting its bytes instead of buffering it."""
        record = flow.metadata.get("agent_runner")
        if flow.response is None or not isinstance(record, DecisionRecord):
            return

        def count(chunk: bytes) -> bytes:
            record.bytes_to_agent += len(chunk)
            return chunk

        flow.response.stream = count

    async def response(self, flow: http.HTTPFlow) -> None:
        """Close the record of a completed request and add its bytes to the agent's count."""
        record = flow.metadata.get("agent_runner")
        if not isinstance(record, DecisionRecord) or record.finished:
            return
        if flow.websocket is not None:
            return  # an upgraded connection is recorded when it ends, in websocket_end
        if flow.request.raw_content is not None:
            record.bytes_from_agent += len(flow.request.raw_content)
        record.finish(status=flow.response.status_code if flow.response else None)
        await self._add_bytes(record)

    async def error(self, flow: http.HTTPFlow) -> None:
        """Close the record of a failed request; a body over the limit is its own reason."""
        record = flow.metadata.get("agent_runner")
        if not isinstance(record, DecisionRecord):
            state = self.states.get(flow.client_conn.id)
            record = self._record(
                client=flow.client_conn,
                state=state,
                protocol="http",
                decision=Decision.deny(Reason.PROTOCOL_NOT_ALLOWED, "malformed request"),
            )
        message = flow.error.msg if flow.error else "unknown error"
        if _BODY_LIMIT_ERROR in message:
            record.finish(
                status=413,
                decision=Decision.deny(
                    Reason.BODY_TOO_LARGE,
                    f"request body over --max-request-body-bytes "
                    f"{self.settings.max_request_body_bytes}",
                ),
            )
        else:
            # A client that hangs up during the response ends the flow with an error, but
            # the upstream's status is what the agent was sent.
            if record.status is None:
                record.status = flow.response.status_code if flow.response else 502
            record.decision = (
                record.decision
                if not record.decision.allowed
                else Decision.allow(f"{record.decision.detail}; failed: {message}")
            )
            record.finish()
        await self._add_bytes(record)

    # CONNECT and TLS

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """Decide a CONNECT to the explicit proxy; the tunnel's TLS name must match it."""
        state = self.states.get(flow.client_conn.id)
        record = self._record(
            client=flow.client_conn,
            state=state,
            protocol="connect",
            decision=_PENDING,
        )
        record.method = "CONNECT"
        record.host, record.port = flow.request.host, flow.request.port
        flow.metadata["agent_runner"] = record
        if state is None:
            self._deny(flow, record, record.decision)
            return
        try:
            if state.connect is not None:
                raise Denied(Decision.deny(Reason.PROTOCOL_NOT_ALLOWED, "CONNECT inside a tunnel"))
            await self._admit(state, self.limiter)
            target = await self._resolve(state, flow.request.host, flow.request.port)
        except Denied as denied:
            self._deny(flow, record, denied.decision, retry_after=denied.retry_after)
            return
        state.connect = target
        record.host = target.host
        record.upstream = f"{target.address}:{target.port}"
        flow.request.data.host = str(target.address)
        record.finish(status=200, decision=Decision.allow(f"tunnel to {target.host!r}"))

    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Choose the next layer; TLS is decided here, from the ClientHello, before any
        upstream connection exists (the connection strategy is lazy)."""
        if nextlayer.layer is not None:
            return
        context = nextlayer.context
        state = self.states.get(context.client.id)
        if state is None:
            nextlayer.layer = _CloseClient(context)
            return
        top_of_explicit = state.mode == "explicit" and len(context.layers) <= 2
        if state.mode == "dns" or top_of_explicit or context.client.tls:
            super().next_layer(nextlayer)
            return
        data = nextlayer.data_client()
        if not data:
            return
        if not starts_like_tls_record(data):
            # Plain text: HTTP, decided per request in requestheaders; anything else fails
            # to parse as HTTP and is closed (rawtcp is off).
            super().next_layer(nextlayer)
            return
        rejection: Decision | None = None
        try:
            hello = parse_client_hello(data)
        except ValueError:
            hello = None
            rejection = Decision.deny(Reason.PROTOCOL_NOT_ALLOWED, "malformed TLS ClientHello")
        else:
            if hello is None:
                return  # wait for the rest of the ClientHello
        await self._decide_tls(nextlayer, state, hello, rejection)

    async def _decide_tls(
        self,
        nextlayer: layer.NextLayer,
        state: ClientState,
        hello: Any,
        rejection: Decision | None,
    ) -> None:
        context = nextlayer.context
        record = self._record(
            client=context.client,
            state=state,
            protocol="tls",
            decision=_PENDING,
        )
        port = context.server.address[1] if context.server.address else 0
        record.port = port
        try:
            if rejection is not None:
                raise Denied(rejection)
            sni = hello.sni
            record.host = sni
            if not sni:
                raise Denied(
                    Decision.deny(Reason.SNI_MISSING, "the TLS ClientHello has no server name")
                )
            if state.connect is not None:
                if _same_host(sni, state.connect.host) is not True:
                    raise Denied(
                        Decision.deny(
                            Reason.HOST_MISMATCH,
                            f"TLS server name {sni!r} differs from the CONNECT host "
                            f"{state.connect.host!r}",
                        )
                    )
                target = state.connect
            else:
                await self._admit(state, self.limiter)
                target = await self._resolve(state, sni, port)
        except Denied as denied:
            record.finish(decision=denied.decision)
            nextlayer.layer = _CloseClient(context)
            return
        record.host = target.host
        record.port = target.port
        record.upstream = f"{target.address}:{target.port}"
        record.decision = Decision.allow(f"TLS to {target.host!r} via {target.address}")
        if context.client.id not in self.states:
            record.finish()  # the client left while the ClientHello was decided
            nextlayer.layer = _CloseClient(context)
            return
        self._approve(state, target)
        context.server.address = (str(target.address), target.port)
        context.server.sni = target.host
        if self.settings.tls_inspection:
            state.tls_target = target
            record.protocol = "tls-inspected"
            record.finish()
            super().next_layer(nextlayer)
            return
        # A TCP layer that is not "ignored" reports each message, so bytes can be counted.
        nextlayer.layer = layers.TCPLayer(context)
        self._tls_records[context.client.id] = record

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """Count passed-through TLS bytes, then drop the message so memory stays flat."""
        record = self._tls_records.get(flow.client_conn.id)
        message = flow.messages[-1]
        if record is not None:
            if message.from_client:
                record.bytes_from_agent += len(message.content)
            else:
                record.bytes_to_agent += len(message.content)
        flow.messages.clear()

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Count the bytes of an upgraded WebSocket connection, then drop the message."""
        record = flow.metadata.get("agent_runner")
        if flow.websocket is None or not flow.websocket.messages:
            return
        message = flow.websocket.messages[-1]
        if isinstance(record, DecisionRecord):
            if message.from_client:
                record.bytes_from_agent += len(message.content)
            else:
                record.bytes_to_agent += len(message.content)
        flow.websocket.messages.clear()

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        """Close the record of an upgraded WebSocket connection with its bytes."""
        record = flow.metadata.get("agent_runner")
        if isinstance(record, DecisionRecord) and not record.finished:
            record.finish(status=flow.response.status_code if flow.response else None)
            await self._add_bytes(record)

    async def tcp_end(self, flow: tcp.TCPFlow) -> None:
        """Close the record of a passed-through TLS connection."""
        record = self._tls_records.pop(flow.client_conn.id, None)
        if record is not None:
            record.finish()
            await self._add_bytes(record)

    async def tcp_error(self, flow: tcp.TCPFlow) -> None:
        """Close the record of a TLS connection that failed upstream."""
        record = self._tls_records.pop(flow.client_conn.id, None)
        if record is not None:
            if flow.error:
                record.decision = Decision.allow(
                    f"{record.decision.detail}; failed: {flow.error.msg}"
                )
            record.finish()
            await self._add_bytes(record)

    async def _add_bytes(self, record: DecisionRecord) -> None:
        total = record.bytes_from_agent + record.bytes_to_agent
        if record.agent_id is None or total == 0:
            return
        try:
            await self.limiter.add_bytes(record.agent_id, total)
        except StoreError as exc:
            logger.error(
                "cannot count %d bytes of agent %s: %s",
                total,
                record.agent_id,
                exc,
                extra={logs.AGENT_ID: record.agent_id},
            )

    # DNS

    async def dns_request(self, flow: mdns.DNSFlow) -> None:
        """Answer A and AAAA queries for allowed names from checked answers; refuse the rest.

        No query for a denied name, and no query of another type, ever leaves the host.
        """
        state = self.states.get(flow.client_conn.id)
        record = self._record(
            client=flow.client_conn,
            state=state,
            protocol="dns",
            decision=_PENDING,
            event_type="proxy.dns_query",
        )
        request = flow.request
        try:
            if state is None:
                raise Denied(record.decision)
            await self._admit(state, self.dns_limiter)
            if not request.query or request.op_code != 0 or len(request.questions) != 1:
                raise Denied(
                    Decision.deny(
                        Reason.DNS_MALFORMED,
                        "expected a standard query with exactly one question",
                    )
                )
            question = request.questions[0]
            record.host = question.name
            record.method = _type_name(question.type)
            checked = check_query(question.name, question.type, question.class_)
            if not checked.allowed:
                raise Denied(checked)
            name = normalized_query_name(question.name)
            record.host = name
            decision = state.policy.decide(name)
            if not decision.allowed:
                raise Denied(decision)
            try:
                answer = await self.resolver.resolve(name, question.type)
            except ResolutionError as exc:
                raise Denied(Decision.deny(Reason.RESOLUTION_FAILED, str(exc))) from exc
            if answer.addresses:
                addresses = state.policy.decide_addresses(answer.addresses)
                if not addresses.allowed:
                    raise Denied(Decision.deny(addresses.reason, f"{name!r}: {addresses.detail}"))
        except Denied as denied:
            code = (
                response_codes.SERVFAIL
                if denied.decision.reason is Reason.RESOLUTION_FAILED
                else response_codes.REFUSED
            )
            flow.response = request.fail(code)
            record.finish(status=code, decision=denied.decision)
            return
        ttl = min(answer.ttl, self.settings.dns_cache_seconds)
        flow.response = request.succeed(
            [_resource_record(question.name, address, ttl) for address in answer.addresses]
        )
        record.finish(
            status=response_codes.NOERROR,
            decision=Decision.allow(
                f"{name!r}: {', '.join(str(a) for a in answer.addresses) or 'no records'}"
            ),
        )


def _resource_record(
    name: str, address: IPv4Address | IPv6Address, ttl: int
) -> mdns.ResourceRecord:
    if isinstance(address, IPv4Address):
        return mdns.ResourceRecord.A(name, address, ttl=ttl)
    return mdns.ResourceRecord.AAAA(name, address, ttl=ttl)


def _type_name(rdtype: int) -> str:
    with contextlib.suppress(ValueError):
        return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))
    return str(rdtype)


def _same_host(first: str, second: str) -> bool | None:
    """Compare two agent-supplied hosts after normalisation; None if either is invalid."""
    try:
        return normalize_host(first) == normalize_host(second)
    except HostInvalid:
        return None
