"""A cap on the bytes of an HTTP/1 request head that mitmproxy buffers before parsing it.

mitmproxy 11.0.2 buffers a request head until the blank line that ends it, without limit (its
source marks the spot "FIXME: protect against header size DoS"), so an agent that never sends
the blank line could fill the proxy's memory. `install` wraps the HTTP/1 server's header state:
once more than `limit` bytes are buffered without a complete head, the agent gets 431 and the
connection is closed. Heads that arrive whole are measured again by the filter addon, which
answers 431 too. The wrapper depends on mitmproxy's internals, so it refuses any other version.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import mitmproxy.version
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import connection
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import _http1

SUPPORTED_MITMPROXY = "11.0.2"

RejectCallback = Callable[[connection.Connection, int], None]


def install(limit: int, on_reject: RejectCallback) -> None:
    """Cap buffered request heads at `limit` bytes; `on_reject(client, size)` records each cut.

    Raises RuntimeError for a mitmproxy version the wrapper was not written for.
    """
    if mitmproxy.version.VERSION != SUPPORTED_MITMPROXY:
        raise RuntimeError(
            f"the request head limit is written for mitmproxy {SUPPORTED_MITMPROXY}, not "
            f"{mitmproxy.version.VERSION}; install mitmproxy=={SUPPORTED_MITMPROXY}"
        )
    server = _http1.Http1Server
    original = getattr(server, "_agent_runner_read_headers", server.read_headers)

    def read_headers(
        self: _http1.Http1Server, event: events.ConnectionEvent
    ) -> Generator[commands.Command, Any, None]:
        if isinstance(event, events.DataReceived) and len(self.buf) > limit:
            head_end = bytes(self.buf)[: limit + 4].find(b"\r\n\r\n")
            if head_end < 0:
                on_reject(self.conn, len(self.buf))
                self.buf = ReceiveBuffer()
                self.state = self.done
                yield commands.SendData(
                    self.conn,
                    _http1.make_error_response(431, "request head exceeds the proxy's limit"),
                )
                yield commands.CloseConnection(self.conn)
                return
        yield from original(self, event)

    server._agent_runner_read_headers = original  # type: ignore[attr-defined]
    server.read_headers = read_headers  # type: ignore[method-assign]
