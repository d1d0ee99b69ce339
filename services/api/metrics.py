"""Prometheus metrics of the gateway, behind their own key or on their own listener.

`MetricsMiddleware` is the outermost middleware. It counts every response by route template
and status class, and the failed authentications and rate-limit rejections that the access
middleware decided, which that middleware leaves in `scope["state"]`. It serves `GET /metrics`
on the gateway's port only with `--metrics-api-key`, which is a secret of its own, so an API
key does not reveal the metrics and the metrics key opens nothing else. With
`--metrics-bind`, `main` serves `metrics_app` on that address alone, and the gateway's port
has no `/metrics`. Without either option no listener serves metrics. A request for `/metrics`
without the right key passes on like any other path, so it gets 401 without an API key and
404 with one.

Agents by state come from the agent store and are cached for `AGENT_COUNT_TTL` seconds, so a
scrape reads Redis at most that often. Firewall states are the ones `/readyz` reports. The
image cache's metrics are the supervisor's and are served by each supervisor itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Iterator, Sequence
from typing import get_args

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common.errors import ConfigurationError, StoreError
from libs.common.messages import AgentState
from libs.common.store import AgentStore
from services.api.auth import Authentication, KeyRing
from services.api.ratelimit import RateDecision
from services.api.readiness import FirewallStates, FirewallStatus

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
METRICS_KEY_HEADER = "x-metrics-key"
# Seconds a count of agents by state is reused, so frequent scrapes do not load Redis.
AGENT_COUNT_TTL = 5.0
# Most agent records one count reads (newest first); older records are left out.
MAX_COUNTED_AGENTS = 10_000
# Label of requests that match no route, so arbitrary paths add no label values.
UNMATCHED_ROUTE = "unmatched"


class GatewayMetrics:
    """The gateway's counters and the collectors of agent and firewall states.

    Each app has a registry of its own, so tests can build several apps in one process.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "agent_runner_api_requests",
            "Responses of the gateway, by route template and status class (2xx to 5xx).",
            ["route", "status_class"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "agent_runner_api_auth_failures",
            "Requests rejected with 401, by reason (missing_key, invalid_key, api_key_in_query).",
            ["reason"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "agent_runner_api_rate_limited",
            "Requests rejected with 429, by the bucket that was empty.",
            ["bucket"],
            registry=self.registry,
        )
        self.states = StateCollector()
        self.registry.register(self.states)
        # The child counter of each (route template, status class). Routes are templates or
        # UNMATCHED_ROUTE and the class is a digit, so the dict stays small, and reusing the
        # child skips the label lookup that `labels()` does on every call.
        self._request_counters: dict[tuple[str, int], Counter] = {}

    def observe(self, route: str, status: int, state: dict[str, object]) -> None:
        """Count one response and the access decision that the access middleware stored."""
        status_class = status // 100
        counter = self._request_counters.get((route, status_class))
        if counter is None:
            counter = self.requests.labels(route=route, status_class=f"{status_class}xx")
            self._request_counters[(route, status_class)] = counter
        counter.inc()
        decision = state.get("rate_decision")
        if isinstance(decision, RateDecision) and not decision.allowed:
            level = decision.limiting
            self.rate_limited.labels(bucket=level.charge.kind.value if level else "client").inc()
            return
        auth = state.get("auth")
        if isinstance(auth, Authentication) and not auth.ok and status == 401:
            self.auth_failures.labels(reason=auth.reason.value).inc()

    def render(self) -> bytes:
        """Return every metric in the Prometheus text format."""
        return generate_latest(self.registry)


class StateCollector(Collector):
    """Export the latest counts of agents by state and the firewall status of each host."""

    def __init__(self) -> None:
        self.store: AgentStore | None = None
        self.firewall: FirewallStates | None = None
        self.agent_counts: dict[AgentState, int] | None = None
        self.counted_at = float("-inf")

    def follow(self, *, store: AgentStore, firewall: FirewallStates) -> None:
        """Read agent states from `store` and firewall states from `firewall` from now on."""
        self.store = store
        self.firewall = firewall

    async def refresh(self) -> None:
        """Count agents by state again when the last count is older than AGENT_COUNT_TTL."""
        if self.store is None or time.monotonic() - self.counted_at < AGENT_COUNT_TTL:
            return
        try:
            records = await self.store.list_recent(limit=MAX_COUNTED_AGENTS)
        except StoreError as exc:
            # The gauge disappears instead of showing an old count as current.
            logger.warning("cannot count agents by state for /metrics: %s", exc)
            self.agent_counts = None
            return
        counts = dict.fromkeys(AgentState, 0)
        for record in records:
            counts[record.state] += 1
        self.agent_counts = counts
        self.counted_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        """Yield agents by state and, per host, 1 for its firewall status and 0 for the others."""
        if self.agent_counts is not None:
            agents = GaugeMetricFamily(
                "agent_runner_agents",
                f"Agents by state, among the newest {MAX_COUNTED_AGENTS} records in the store.",
                labels=["state"],
            )
            for state, count in self.agent_counts.items():
                agents.add_metric([state.value], count)
            yield agents

        firewall = GaugeMetricFamily(
            "agent_runner_host_firewall_status",
            "1 for each host's current firewall status as its netguard published it "
            "(verified, disabled, unverified, stale), 0 for the other statuses.",
            labels=["host", "status"],
        )
        statuses = self.firewall.status() if self.firewall is not None else {}
        for host, current in statuses.items():
            for status in get_args(FirewallStatus):
                firewall.add_metric([host, status], 1 if status == current else 0)
        yield firewall


def leaf_routes(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """Return `routes` with each included router replaced by its own routes.

    FastAPI 0.165 wraps each `include_router` in a private `_IncludedRouter` whose
    `original_router` contains the routes, with their prefix already in their path.
    """
    leaves: list[BaseRoute] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            leaves.extend(leaf_routes(included.routes))
        else:
            leaves.append(route)
    return leaves


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """Return the path template of the route that serves `scope`, or UNMATCHED_ROUTE.

    A routed request carries its route in the scope. One that the access middleware rejected
    before routing is matched here, so a 401 for `/v1/agents/ag-…` counts under
    `/v1/agents/{agent_id}` and never under its raw path.
    """
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", UNMATCHED_ROUTE))
    partial = None
    for candidate in routes:
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return str(getattr(candidate, "path", UNMATCHED_ROUTE))
        if match is Match.PARTIAL and partial is None:
            partial = str(getattr(candidate, "path", UNMATCHED_ROUTE))
    return partial or UNMATCHED_ROUTE


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class MetricsKey:
    """The --metrics-api-key, kept as a digest and compared in constant time."""

    def __init__(self, key: str) -> None:
        self._digest = _digest(key)

    def matches(self, scope: Scope) -> bool:
        """Return whether the request carries the key in X-Metrics-Key or as a bearer token."""
        headers = Headers(scope=scope)
        presented = headers.get(METRICS_KEY_HEADER, "").strip()
        if not presented:
            scheme, _, credentials = headers.get("authorization", "").partition(" ")
            presented = credentials.strip() if scheme.lower() == "bearer" else ""
        if not presented:
            return False
        return hmac.compare_digest(_digest(presented), self._digest)


def check_metrics_key(key: str | None, keyring: KeyRing) -> None:
    """Raise ConfigurationError when --metrics-api-key is also an API key.

    A shared secret would let a metrics scraper start agents.
    """
    if key is not None and keyring.identify(key) is not None:
        raise ConfigurationError(
            "--metrics-api-key equals one of the API keys; create a separate secret for "
            "metrics, for example with 'python -c \"import secrets; "
            "print(secrets.token_urlsafe(32))\"'"
        )


async def send_metrics(metrics: GatewayMetrics, send: Send) -> None:
    """Send the current metrics as the response."""
    await metrics.states.refresh()
    body = metrics.render()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", CONTENT_TYPE_LATEST.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Count every response and serve GET /metrics to callers with the metrics key.

    `key` is None when the gateway's port serves no metrics, either because none are
    configured or because --metrics-bind serves them elsewhere.
    """

    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics, key: MetricsKey | None) -> None:
        self.app = app
        self.metrics = metrics
        self.key = key
        # Filled at the first request, once the app has every route.
        self.routes: list[BaseRoute] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (
            self.key is not None
            and scope["path"] == METRICS_PATH
            and scope["method"] == "GET"
            and self.key.matches(scope)
        ):
            # NOTE: a scrape with the key takes no rate-limit token. A wrong key goes on to the
            # access middleware, which counts it as a failed authentication of the address.
            await send_metrics(self.metrics, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if self.routes is None:
                self.routes = leaf_routes(scope["app"].router.routes)
            route = route_template(self.routes, scope)
            self.metrics.observe(route, status, scope.get("state", {}))


class MetricsApp:
    """The ASGI app of the --metrics-bind listener: GET /metrics and nothing else."""

    def __init__(self, metrics: GatewayMetrics, *, key: MetricsKey | None) -> None:
        self.metrics = metrics
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != METRICS_PATH or scope["method"] != "GET":
            await _plain(send, 404, b"not found; this listener serves only GET /metrics\n")
            return
        if self.key is not None and not self.key.matches(scope):
            await _plain(send, 401, b"missing or invalid metrics key\n")
            return
        await send_metrics(self.metrics, send)


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
