"""Decisions about where agents and the supervisor may connect, and their fixed reason codes.

The egress proxy and the supervisor's image downloader share them. Every allow or deny the
proxy makes for a request ends in one `Decision`. Its `reason` is the
code that the audit trail, the logs, the metrics and the tests use, so a released code keeps
its meaning. `detail` is free text for people and names the offending value.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Fixed reason codes of proxy decisions."""

    ALLOWED = "allowed"
    # Host names
    HOST_INVALID = "host_invalid"
    HOST_NOT_ALLOWED = "host_not_allowed"
    HOST_BLOCKED = "host_blocked"
    IP_LITERAL_DENIED = "ip_literal_denied"
    # Addresses, from an IP literal or a DNS answer
    NO_ADDRESSES = "no_addresses"
    ADDRESS_LOOPBACK = "address_loopback"
    ADDRESS_PRIVATE = "address_private"
    ADDRESS_SHARED = "address_shared"
    ADDRESS_LINK_LOCAL = "address_link_local"
    ADDRESS_UNSPECIFIED = "address_unspecified"
    ADDRESS_MULTICAST = "address_multicast"
    ADDRESS_RESERVED = "address_reserved"
    ADDRESS_UNIQUE_LOCAL = "address_unique_local"
    ADDRESS_EMBEDDED_IPV4 = "address_embedded_ipv4"
    # Callers: the proxy could not map the connection's source to a registered agent.
    UNKNOWN_AGENT = "unknown_agent"
    # Requests: the names an agent gives in CONNECT, SNI, Host and the URL must agree.
    HOST_MISMATCH = "host_mismatch"
    SNI_MISSING = "sni_missing"
    PORT_NOT_ALLOWED = "port_not_allowed"
    PROTOCOL_NOT_ALLOWED = "protocol_not_allowed"
    RESOLUTION_FAILED = "resolution_failed"
    # The last check before any upstream connection: only addresses approved for the client.
    UPSTREAM_NOT_APPROVED = "upstream_not_approved"
    # Limits
    HEADERS_TOO_LARGE = "headers_too_large"
    BODY_TOO_LARGE = "body_too_large"
    RATE_LIMITED = "rate_limited"
    BANDWIDTH_EXCEEDED = "bandwidth_exceeded"
    LIMITER_UNAVAILABLE = "limiter_unavailable"
    # DNS filter
    DNS_TYPE_REFUSED = "dns_type_refused"
    DNS_NAME_INVALID = "dns_name_invalid"
    DNS_MALFORMED = "dns_malformed"


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The outcome of one check: allowed or not, the fixed reason code and a detail for people.

    `allowed` is true exactly when `reason` is `Reason.ALLOWED`, and construction raises
    `ValueError` otherwise, so a caller may test either field.
    """

    allowed: bool
    reason: Reason
    detail: str

    def __post_init__(self) -> None:
        if self.allowed != (self.reason is Reason.ALLOWED):
            raise ValueError(
                f"inconsistent decision: allowed={self.allowed!r} with reason {self.reason!r}"
            )

    @classmethod
    def allow(cls, detail: str) -> Decision:
        """Return an allowing decision with reason `allowed`."""
        return cls(allowed=True, reason=Reason.ALLOWED, detail=detail)

    @classmethod
    def deny(cls, reason: Reason, detail: str) -> Decision:
        """Return a denying decision with `reason`, which must not be `Reason.ALLOWED`."""
        return cls(allowed=False, reason=reason, detail=detail)
