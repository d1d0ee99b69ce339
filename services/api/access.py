"""Access control of each request: client address, authentication, rate limits and audit.

The access middleware calls `AccessControl.check` once per request, before routing, so every
path is covered the same way whatever the router makes of it. Every path but `/healthz`
needs a key, and unknown paths are no exception, so an anonymous caller learns nothing about
the routes. The rate-limit buckets are keyed by client address and key id, never by path, so
`//v1/agents`, `/V1/agents` or a percent-encoded spelling draw from the same buckets.

Buckets per request:

- `/healthz`: the client address.
- An authenticated request: the client address, the key and the global bucket, and the
  address's failed-authentication bucket must not be empty.
- A failed authentication: the client address and its failed-authentication bucket.

A failed authentication does not draw from the global bucket, so anonymous floods from many
addresses cannot lock out key holders. Once an address has used up its failed-authentication
bucket, its requests get 429 until the bucket refills, even with a valid key, because
otherwise the difference between 429 and 200 would still tell a guesser which key is right.

Audit: each failed authentication is one event (`auth.failed`, or `auth.rejected` for a key
in the URL) with the client address and never the key. Successes and rate-limited requests
are counted per group and window (services/api/repeats.py): `auth.succeeded` per key id and
client address, `ratelimit.rejected` per client address and bucket. A failure over its
address's limit gets 429 and is counted there instead of audited on its own, which bounds the
audit volume per address.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import Scope

from libs.common import logs
from libs.common.audit import AuditPublisher
from libs.common.messages import AuditOutcome
from services.api.auth import Authentication, AuthReason, KeyRing, authenticate
from services.api.errors import UNAUTHORIZED_MESSAGE, error_response
from services.api.forwarded import ClientAddress, ClientAddressResolver
from services.api.ratelimit import BucketKind, BucketSpec, Charge, RateDecision, RateLimiter
from services.api.repeats import RepeatedEvents

logger = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
KEY_IN_QUERY_MESSAGE = (
    "API keys in the URL are rejected because URLs get logged; send the key in the "
    "X-API-Key header or as Authorization: Bearer"
)
# Longest path an audit event records; the rest is cut off.
_AUDITED_PATH_LENGTH = 256


@dataclass(frozen=True, kw_only=True)
class AccessLimits:
    """The size of each kind of bucket."""

    client: BucketSpec
    key: BucketSpec
    overall: BucketSpec
    auth_failures: BucketSpec

    def charges(self, client: ClientAddress, auth: Authentication | None) -> list[Charge]:
        """Return the buckets a request draws from; `auth` is None when it needs no key."""
        by_address = Charge(kind=BucketKind.CLIENT, subject=client.bucket, spec=self.client)
        if auth is None:
            return [by_address]
        failures = Charge(
            kind=BucketKind.AUTH_FAILURES,
            subject=client.bucket,
            spec=self.auth_failures,
            cost=0 if auth.ok else 1,
        )
        if not auth.ok:
            return [by_address, failures]
        assert auth.key_id is not None
        by_key = Charge(kind=BucketKind.KEY, subject=auth.key_id, spec=self.key)
        overall = Charge(kind=BucketKind.GLOBAL, subject="", spec=self.overall)
        return [by_address, by_key, overall, failures]


@dataclass(frozen=True)
class AccessResult:
    """The outcome of `AccessControl.check`.

    `response` is the 401 or 429 to send instead of calling the route, or None when the
    request may proceed. `auth` is None for a request that needs no key.
    """

    client: ClientAddress
    auth: Authentication | None
    decision: RateDecision
    response: JSONResponse | None


class AccessControl:
    """Authenticate, rate-limit and audit requests before they reach a route."""

    def __init__(
        self,
        *,
        keyring: KeyRing,
        limiter: RateLimiter,
        resolver: ClientAddressResolver,
        limits: AccessLimits,
        audit: AuditPublisher,
    ) -> None:
        self.keyring = keyring
        self.limiter = limiter
        self.resolver = resolver
        self.limits = limits
        self.audit = audit
        self.successes = RepeatedEvents(
            audit,
            "auth.succeeded",
            outcome=AuditOutcome.SUCCESS,
            reason_code=AuthReason.AUTHENTICATED.value,
        )
        self.rejections = RepeatedEvents(
            audit, "ratelimit.rejected", outcome=AuditOutcome.DENIED, reason_code="rate_limited"
        )

    def start(self) -> None:
        """Start sending the counts of repeated events in the background."""
        self.successes.start()
        self.rejections.start()

    async def close(self) -> None:
        """Send the counts of every open window."""
        await self.successes.close()
        await self.rejections.close()

    async def check(self, scope: Scope) -> AccessResult:
        """Decide whether the request in `scope` reaches its route; see the module docstring."""
        peer = scope.get("client")
        client = self.resolver.resolve(peer[0] if peer else None, scope.get("headers", []))
        auth = self._authenticate(scope)
        decision = await self.limiter.take(self.limits.charges(client, auth))

        if not decision.allowed:
            return AccessResult(client, auth, decision, self._rate_limited(client, auth, decision))
        if auth is None:
            return AccessResult(client, auth, decision, None)
        if auth.ok:
            assert auth.key_id is not None
            self.successes.record(actor=auth.key_id, key_id=auth.key_id, client=client.address)
            return AccessResult(client, auth, decision, None)
        return AccessResult(client, auth, decision, self._unauthorized(scope, client, auth))

    def _authenticate(self, scope: Scope) -> Authentication | None:
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        auth = authenticate(self.keyring, Headers(scope=scope), query)
        if scope["path"] == HEALTH_PATH and auth.reason is not AuthReason.KEY_IN_QUERY:
            return None
        return auth

    def _unauthorized(
        self, scope: Scope, client: ClientAddress, auth: Authentication
    ) -> JSONResponse:
        in_query = auth.reason is AuthReason.KEY_IN_QUERY
        details: dict[str, object] = {
            "key_id": auth.key_id,
            "client": client.address,
            "peer": client.peer,
            "credential": auth.credential.value,
            "method": scope.get("method", ""),
            "path": scope["path"][:_AUDITED_PATH_LENGTH],
        }
        if in_query:
            details["parameter"] = auth.parameter
        self.audit.emit(
            "auth.rejected" if in_query else "auth.failed",
            outcome=AuditOutcome.DENIED,
            actor=client.address,
            reason_code=auth.reason.value,
            details=details,
        )
        logger.warning(
            "authentication failed from %s: %s",
            client.address,
            auth.reason.value,
            extra={logs.CLIENT: client.address, logs.REASON: auth.reason.value},
        )
        if in_query:
            return error_response(401, AuthReason.KEY_IN_QUERY.value, KEY_IN_QUERY_MESSAGE)
        return error_response(401, "unauthorized", UNAUTHORIZED_MESSAGE)

    def _rate_limited(
        self, client: ClientAddress, auth: Authentication | None, decision: RateDecision
    ) -> JSONResponse:
        level = decision.limiting
        kind = level.charge.kind if level else BucketKind.CLIENT
        opened = self.rejections.record(
            actor=client.address, client=client.address, bucket=kind.value
        )
        if opened:
            logger.warning(
                "request from %s over the %s rate limit; further rejections of it are counted "
                "for a minute",
                client.address,
                kind.value,
                extra={logs.CLIENT: client.address, logs.REASON: "rate_limited"},
            )
        return error_response(429, "rate_limited", _limit_message(client, auth, decision))


def _limit_message(
    client: ClientAddress, auth: Authentication | None, decision: RateDecision
) -> str:
    level = decision.limiting
    assert level is not None
    spec = level.charge.spec
    limit = f"the limit is {spec.rate:g} per second with bursts of {spec.burst}"
    retry = f"retry after {decision.retry_after} s"
    match level.charge.kind:
        case BucketKind.KEY:
            key_id = auth.key_id if auth else None
            return f"too many requests with API key {key_id!r}: {limit}; {retry}"
        case BucketKind.GLOBAL:
            return f"the gateway is over its overall request limit: {limit}; {retry}"
        case BucketKind.AUTH_FAILURES:
            return (
                f"too many failed authentications from client address {client.address}: "
                f"{limit}; check the API key, then {retry}"
            )
        case _:
            return f"too many requests from client address {client.address}: {limit}; {retry}"
