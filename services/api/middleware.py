"""ASGI middleware of the gateway, outermost first: request ids, access control, body limits.

Request ids come first so that every response, including 401, 429 and 413, carries one.
Access control (services/api/access.py) comes before the body limit so that every request is
authenticated and counted before the gateway reads a byte of its body, and so that every
response carries the rate-limit headers.

Written as plain ASGI instead of Starlette's BaseHTTPMiddleware so that streamed request and
response bodies pass through without being buffered.
"""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common import logs
from services.api.access import AccessControl
from services.api.errors import BodyTooLarge, error_response

REQUEST_ID_HEADER = b"x-request-id"
RATE_LIMIT_HEADERS = frozenset(
    {b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset"}
)
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def _replace_headers(
    message: Message, names: frozenset[bytes], added: list[tuple[bytes, bytes]]
) -> Message:
    headers = [
        (name, value) for name, value in message.get("headers", []) if name.lower() not in names
    ]
    return {**message, "headers": headers + added}


class RequestIdMiddleware:
    """Bind a request id to the logs and echo it on the response.

    A client's `X-Request-ID` is kept only when it matches a safe pattern; otherwise a new id
    replaces it, so a hostile value never reaches logs or agents.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        added = [(REQUEST_ID_HEADER, request_id.encode())]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = _replace_headers(message, frozenset({REQUEST_ID_HEADER}), added)
            await send(message)

        with logs.correlation_scope(request_id):
            await self.app(scope, receive, send_with_id)


class AccessMiddleware:
    """Authenticate and rate-limit every request, and add the rate-limit headers.

    The AccessControl is read from `app.state.access` at each request, because the app
    creates it at startup, after Starlette has built the middleware. The request's client
    address, key id, authentication, rate decision and rate-limit headers go to
    `scope["state"]`, where routes, the metrics middleware and the handler of unexpected
    errors read them.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # The gateway has no WebSocket routes, and a handshake must not skip the checks.
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        control: AccessControl = scope["app"].state.access
        result = await control.check(scope)
        limit_headers = result.decision.headers()
        state = scope.setdefault("state", {})
        state["client"] = result.client
        state["rate_limit_headers"] = limit_headers
        state["auth"] = result.auth
        state["rate_decision"] = result.decision
        if result.response is not None:
            result.response.raw_headers.extend(limit_headers)
            await result.response(scope, receive, send)
            return
        if result.auth is not None:
            state["key_id"] = result.auth.key_id

        async def send_with_limits(message: Message) -> None:
            # An agent's own X-RateLimit-* headers would be taken for the gateway's.
            if message["type"] == "http.response.start":
                message = _replace_headers(message, RATE_LIMIT_HEADERS, limit_headers)
            await send(message)

        await self.app(scope, receive, send_with_limits)


class BodyLimitMiddleware:
    """Cap request bodies, from Content-Length and while the body streams in.

    Bodies are capped at `passthrough_limit` bytes on agent passthrough routes and
    `control_limit` elsewhere.
    """

    def __init__(self, app: ASGIApp, *, control_limit: int, passthrough_limit: int) -> None:
        self.app = app
        self.control_limit = control_limit
        self.passthrough_limit = passthrough_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.passthrough_limit if "/http/" in scope["path"] else self.control_limit
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(limit, send)
            return
        try:
            await self.app(scope, limited_receive, send_tracked)
        except BodyTooLarge:
            if not started:
                await _too_large(limit, send)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER and _SAFE_REQUEST_ID.fullmatch(value):
            return str(value.decode())
    # 32 random hex digits like uuid4().hex, without building a UUID object for each request.
    return os.urandom(16).hex()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(limit: int, send: Send) -> None:
    response = error_response(
        413, "body_too_large", f"request body is over the limit of {limit} bytes"
    )
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})
