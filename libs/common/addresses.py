"""Classification of the addresses the proxy and the image downloader would connect to.

Whether a host arrives as an IP literal or as a name that DNS resolves, the proxy connects only
if `classify` allows every address, and the supervisor applies the same check to image
sources. The denied ranges are an explicit table instead of the `is_private` and `is_global`
properties of `ipaddress`, whose ranges were revised in patch releases (3.11.10 and 3.12.4
among them). The table keeps the policy the same on every
interpreter and in one place.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from libs.common.decisions import Decision, Reason

# Ranges not listed here are allowed. That includes the documentation ranges 192.0.2.0/24,
# 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32, because the test suite's fake internet
# uses them as public addresses, and they are not routed on the internet.
IPV4_DENIED: tuple[tuple[IPv4Network, Reason], ...] = (
    (IPv4Network("0.0.0.0/8"), Reason.ADDRESS_UNSPECIFIED),
    (IPv4Network("10.0.0.0/8"), Reason.ADDRESS_PRIVATE),
    (IPv4Network("100.64.0.0/10"), Reason.ADDRESS_SHARED),
    (IPv4Network("127.0.0.0/8"), Reason.ADDRESS_LOOPBACK),
    (IPv4Network("169.254.0.0/16"), Reason.ADDRESS_LINK_LOCAL),
    (IPv4Network("172.16.0.0/12"), Reason.ADDRESS_PRIVATE),
    (IPv4Network("192.168.0.0/16"), Reason.ADDRESS_PRIVATE),
    (IPv4Network("224.0.0.0/4"), Reason.ADDRESS_MULTICAST),
    # Contains the limited broadcast address 255.255.255.255.
    (IPv4Network("240.0.0.0/4"), Reason.ADDRESS_RESERVED),
)

# Checked in order, so ::/128 and ::1/128 win over the IPv4-compatible ::/96 that contains them.
IPV6_DENIED: tuple[tuple[IPv6Network, Reason], ...] = (
    (IPv6Network("::/128"), Reason.ADDRESS_UNSPECIFIED),
    (IPv6Network("::1/128"), Reason.ADDRESS_LOOPBACK),
    (IPv6Network("fe80::/10"), Reason.ADDRESS_LINK_LOCAL),
    # Site-local, deprecated by RFC 3879, but some networks still route it like private space.
    (IPv6Network("fec0::/10"), Reason.ADDRESS_PRIVATE),
    (IPv6Network("fc00::/7"), Reason.ADDRESS_UNIQUE_LOCAL),
    (IPv6Network("ff00::/8"), Reason.ADDRESS_MULTICAST),
)

# Prefixes whose addresses carry an IPv4 address that a host, relay or translator may reach.
# All of them are denied whatever the IPv4 address is, because the proxy would otherwise have
# to trust every translator on the path to map them the same way.
IPV4_MAPPED = IPv6Network("::ffff:0:0/96")
IPV4_TRANSLATED = IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765
IPV4_COMPATIBLE = IPv6Network("::/96")  # deprecated by RFC 4291
SIX_TO_FOUR = IPv6Network("2002::/16")
NAT64_WELL_KNOWN = IPv6Network("64:ff9b::/96")  # RFC 6052
NAT64_LOCAL_USE = IPv6Network("64:ff9b:1::/48")  # RFC 8215
TEREDO = IPv6Network("2001::/32")

# Prefixes that carry the IPv4 address in the last 32 bits, with the name of each kind.
_LAST_32_BITS_PREFIXES = (
    (IPV4_MAPPED, "IPv4-mapped"),
    (IPV4_TRANSLATED, "IPv4-translated"),
    (IPV4_COMPATIBLE, "IPv4-compatible"),
    (NAT64_WELL_KNOWN, "NAT64"),
    # The IPv4 position depends on the operator's prefix length (/48 to /96, RFC 6052
    # section 2.2). The detail names the /96 reading, the layout of the well-known prefix.
    (NAT64_LOCAL_USE, "NAT64 local use, read as a /96 prefix"),
)


def classify(address: IPv4Address | IPv6Address) -> Decision:
    """Allow a public address, or deny it with the reason code of the range it is in.

    An IPv6 address that embeds an IPv4 address is denied as `address_embedded_ipv4`, with
    the embedded address named in the detail.
    """
    if isinstance(address, IPv4Address):
        for network4, reason in IPV4_DENIED:
            if address in network4:
                return Decision.deny(reason, f"{address} is in {network4}")
        return Decision.allow(f"{address} is in no denied range")

    for network6, reason in IPV6_DENIED:
        if address in network6:
            return Decision.deny(reason, f"{address} is in {network6}")

    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return Decision.deny(Reason.ADDRESS_EMBEDDED_IPV4, f"{address} {embedded}")
    return Decision.allow(f"{address} is in no denied range")


def _embedded_ipv4(address: IPv6Address) -> str | None:
    """Describe the IPv4 address that `address` embeds, or return None if it embeds none."""
    if address.sixtofour is not None:
        return f"embeds IPv4 {address.sixtofour} (6to4, {SIX_TO_FOUR})"
    if address.teredo is not None:
        server, client = address.teredo
        return f"embeds IPv4 {client} with server {server} (Teredo, {TEREDO})"

    last_32_bits = IPv4Address(int(address) & 0xFFFFFFFF)
    for network, kind in _LAST_32_BITS_PREFIXES:
        if address in network:
            return f"embeds IPv4 {last_32_bits} ({kind}, {network})"
    return None
