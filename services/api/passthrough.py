"""Forwarding of client requests to an agent's HTTP port, streaming both ways.

The agent is hostile, so what crosses here is filtered in both directions: the client's
credentials and hop-by-hop headers never reach the agent, and the agent's hop-by-hop headers
never reach the client. Responses are capped in size and every wait is bounded by
`--request-timeout`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse

from libs.common import logs
from libs.common.messages import AgentRecord
from services.api.errors import ApiError

logger = logging.getLogger(__name__)

# RFC 9110 section 7.6.1 connection-specific fields, plus our own credentials and fields a
# client must not choose for the agent (Host is set from the agent's address).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "authorization", "x-api-key", "content-length"}
_NOT_RETURNED = _HOP_BY_HOP | {"x-request-id"}


def _filtered(
    headers: list[tuple[bytes, bytes]], dropped: frozenset[str]
) -> list[tuple[bytes, bytes]]:
    named_by_connection: set[str] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named_by_connection.update(
                token.strip().lower() for token in value.decode("latin-1").split(",")
            )
    kept = []
    for name, value in headers:
        lowered = name.decode("latin-1").lower()
        if lowered in dropped or lowered in named_by_connection:
            continue
        kept.append((name, value))
    return kept


class Forwarder:
    """Send requests to agents over one pooled HTTP client."""

    def __init__(self, *, timeout: float, max_response: int) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        )
        self._max_response = max_response

    async def close(self) -> None:
        """Close pooled connections to agents."""
        await self._client.aclose()

    async def forward(
        self, request: Request, record: AgentRecord, raw_path: bytes
    ) -> StreamingResponse:
        """Forward `request` to `record`'s agent at `raw_path` and stream the response back.

        Raises ApiError 502 when the agent cannot be reached and 504 when it does not respond
        within the timeout.
        """
        assert record.host_address is not None and record.host_port is not None
        url = httpx.URL(
            scheme="http",
            host=record.host_address,
            port=record.host_port,
            raw_path=b"/" + raw_path.lstrip(b"/") + _query(request),
        )
        headers = _filtered(request.headers.raw, _NOT_FORWARDED)
        headers.append((b"x-request-id", str(logs.current_correlation_id()).encode()))
        content_length = request.headers.get("content-length")
        body = (
            None if request.method in {"GET", "HEAD"} and not content_length else request.stream()
        )
        if content_length is not None:
            headers.append((b"content-length", content_length.encode()))
        upstream = self._client.build_request(request.method, url, headers=headers, content=body)
        try:
            response = await self._client.send(upstream, stream=True)
        except httpx.TimeoutException as exc:
            raise ApiError(
                504,
                "agent_timeout",
                f"agent {record.agent_id} did not respond within --request-timeout",
            ) from exc
        except httpx.HTTPError as exc:
            logger.warning(
                "cannot reach agent %s: %r",
                record.agent_id,
                exc,
                extra={logs.AGENT_ID: record.agent_id},
            )
            raise ApiError(
                502, "agent_unreachable", f"agent {record.agent_id} cannot be reached"
            ) from exc
        return _streaming(response, self._capped(response, record.agent_id))

    async def _capped(self, response: httpx.Response, agent_id: str) -> AsyncIterator[bytes]:
        sent = 0
        try:
            async for chunk in response.aiter_raw():
                sent += len(chunk)
                if sent > self._max_response:
                    logger.warning(
                        "response of agent %s cut off at %d bytes (--max-passthrough-response)",
                        agent_id,
                        self._max_response,
                        extra={logs.AGENT_ID: agent_id},
                    )
                    return
                yield chunk
        except httpx.HTTPError as exc:
            logger.warning(
                "response of agent %s broke off: %r", agent_id, exc, extra={logs.AGENT_ID: agent_id}
            )


def _streaming(response: httpx.Response, body: AsyncIterator[bytes]) -> StreamingResponse:
    streaming = StreamingResponse(
        body, status_code=response.status_code, background=BackgroundTask(response.aclose)
    )
    streaming.raw_headers = _filtered(response.headers.raw, _NOT_RETURNED)
    return streaming


def _query(request: Request) -> bytes:
    query = request.scope.get("query_string", b"")
    return b"?" + query if query else b""
