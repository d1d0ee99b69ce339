"""The plain HTTP listener of --http-redirect-port, which sends every client to HTTPS.

It runs no gateway code: every request, whatever its method, path or headers, gets an empty
308 response whose `Location` is the same path and query on the configured public origin.
The origin comes from --public-host and --public-port only. Copying the request's `Host`
header would let anyone who can send a request choose where the redirect points. 308 keeps
the method and body, so a POST is sent again over HTTPS.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from urllib.parse import quote_from_bytes

import uvicorn
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

# Characters kept as they are in a redirected path: RFC 3986 unreserved and sub-delims, ":",
# "@", "/" and "%", so existing percent-escapes pass unchanged. Anything else, such as a
# backslash, a space or a byte above 0x7f, is percent-encoded, so the `Location` value is
# ASCII and cannot end the header.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"
_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key"})
# At most one warning about credentials sent in clear text per this many seconds. Each
# warning counts the requests since the previous one.
_CREDENTIAL_WARNING_INTERVAL = 60.0


def public_origin(host: str, port: int) -> str:
    """Return the https:// origin of `host` and `port`, without the port when it is 443."""
    return f"https://{host}" if port == 443 else f"https://{host}:{port}"


def redirect_target(scope: Scope) -> str:
    """Return the path and query of the request in `scope`, percent-encoded as ASCII."""
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    path = quote_from_bytes(raw_path, safe=_PATH_SAFE)
    if not path.startswith("/"):
        # The asterisk form of OPTIONS, or an authority-form CONNECT target.
        path = "/"
    query: bytes = scope.get("query_string", b"")
    if query:
        return f"{path}?{quote_from_bytes(query, safe=_QUERY_SAFE)}"
    return path


class RedirectApp:
    """ASGI app that responds to every HTTP request with a 308 redirect to the public origin."""

    def __init__(self, *, origin: str) -> None:
        self.origin = origin
        self._unwarned_credentials = 0
        self._last_warning = float("-inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The listener runs without lifespan and WebSocket support, so only "http" arrives.
        if scope["type"] != "http":
            return
        location = self.origin + redirect_target(scope)
        self._note_credentials(scope)
        await send(
            {
                "type": "http.response.start",
                "status": 308,
                "headers": [
                    (b"location", location.encode("ascii")),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    def _note_credentials(self, scope: Scope) -> None:
        if not any(name.lower() in _CREDENTIAL_HEADERS for name, _ in scope["headers"]):
            return
        self._unwarned_credentials += 1
        now = time.monotonic()
        if now - self._last_warning < _CREDENTIAL_WARNING_INTERVAL:
            return
        client = scope.get("client")
        logger.warning(
            "API key sent unencrypted to the HTTP redirect port by %s; configure clients with "
            "the https:// URL and rotate the keys they used",
            client[0] if client else "an unknown address",
            extra={"requests_since_last_warning": self._unwarned_credentials},
        )
        self._unwarned_credentials = 0
        self._last_warning = now


class FollowerServer(uvicorn.Server):
    """A uvicorn server that stops when `leader` stops and leaves signals to the leader.

    Each `uvicorn.Server.serve` replaces the SIGINT and SIGTERM handlers with its own, so a
    second server in the same process would take them from the gateway. This one installs
    none and checks the leader's `should_exit` on its 0.1 s tick (uvicorn 0.55).
    """

    def __init__(self, config: uvicorn.Config, *, leader: uvicorn.Server) -> None:
        super().__init__(config)
        self.leader = leader

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        if self.leader.should_exit:
            return True
        return await super().on_tick(counter)


def redirect_config(*, origin: str) -> uvicorn.Config:
    """Return the uvicorn configuration of the redirect listener, which main gives a socket.

    WebSocket support is off, so an upgrade request is an ordinary request and is redirected
    as well, and lifespan is off because the app has nothing to start. uvicorn itself still
    responds with 400 to a request it cannot parse and with 503 to a connection over
    `limit_concurrency`. Neither reaches the app.
    """
    return uvicorn.Config(
        RedirectApp(origin=origin),
        lifespan="off",
        ws="none",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        limit_concurrency=2000,
        timeout_keep_alive=5,
    )
