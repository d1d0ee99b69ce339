"""A record of DNS messages that mitmproxy cannot parse, which reach no addon hook otherwise.

mitmproxy 11.0.2 closes a DNS connection whose message does not parse (a label over 63 octets,
a truncated packet) before any addon hook runs, so the filter could not audit the attempt.
`install` wraps the DNS layer's message parser so that `on_malformed(client, size)` is called
first; the message is still dropped and nothing is forwarded. Like the request-head limit,
the wrapper depends on mitmproxy's internals and refuses any other version.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import mitmproxy.version
from mitmproxy import connection, dns
from mitmproxy.proxy.layers import dns as dns_layer

from services.proxy.header_limit import SUPPORTED_MITMPROXY

MalformedCallback = Callable[[connection.Client, int], None]


def install(on_malformed: MalformedCallback) -> None:
    """Call `on_malformed(client, size)` for each DNS message mitmproxy cannot parse.

    Raises RuntimeError for a mitmproxy version the wrapper was not written for.
    """
    if mitmproxy.version.VERSION != SUPPORTED_MITMPROXY:
        raise RuntimeError(
            f"the DNS parse guard is written for mitmproxy {SUPPORTED_MITMPROXY}, not "
            f"{mitmproxy.version.VERSION}; install mitmproxy=={SUPPORTED_MITMPROXY}"
        )
    layer = dns_layer.DNSLayer
    original = getattr(layer, "_agent_runner_unpack_message", layer.unpack_message)

    def unpack_message(
        self: dns_layer.DNSLayer, data: bytes, from_client: bool
    ) -> list[dns.Message]:
        try:
            messages: list[dns.Message] = original(self, data, from_client)
        except struct.error:
            if from_client:
                on_malformed(self.context.client, len(data))
            raise
        return messages

    layer._agent_runner_unpack_message = original  # type: ignore[attr-defined]
    layer.unpack_message = unpack_message  # type: ignore[method-assign]
