"""ASGI middleware of the gateway: request ids and request body limits.

Written as plain ASGI instead of Starlette's BaseHTTPMiddleware so that streamed request and
response bodies pass through without being buffered.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common import logs
from services.api.errors import BodyTooLarge, error_response

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Bind a request id to the logs and response, and cap request bodies.

    A client's `X-Request-ID` is kept only when it matches a safe pattern; otherwise a new id
    replaces it, so a hostile value never reaches logs or agents. Bodies are capped at
    `passthrough_limit` bytes on agent passthrough routes and `control_limit` elsewhere, both
    from Content-Length and while the body streams in.
    """

    def __init__(self, app: ASGIApp, *, control_limit: int, passthrough_limit: int) -> None:
        self.app = app
        self.control_limit = control_limit
        self.passthrough_limit = passthrough_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        limit = self.passthrough_limit if "/http/" in scope["path"] else self.control_limit
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != REQUEST_ID_HEADER
                ]
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
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

        with logs.correlation_scope(request_id):
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await _too_large(limit, send_with_id)
                return
            try:
                await self.app(scope, limited_receive, send_with_id)
            except BodyTooLarge:
                if not started:
                    await _too_large(limit, send_with_id)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER and _SAFE_REQUEST_ID.fullmatch(value):
            return str(value.decode())
    return uuid.uuid4().hex


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
