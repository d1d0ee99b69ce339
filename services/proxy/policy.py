"""Per-agent domain policy of the egress proxy: which hosts an agent may reach.

The proxy calls `DomainPolicy.decide` with the requested host before it resolves anything,
then `DomainPolicy.decide_addresses` with the DNS answer before it connects. Both return a
`Decision` with a fixed reason code, and the proxy connects only if both allow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from libs.common.addresses import classify
from libs.common.decisions import Decision, Reason
from libs.common.hosts import HostInvalid, normalize_host, parse_ip_literal

WILDCARD_PREFIX = "*."


@dataclass(frozen=True)
class _Patterns:
    """Normalised host patterns: exact names, and the suffixes that wildcards match."""

    exact: frozenset[str]
    suffixes: tuple[str, ...]

    def match(self, host: str) -> str | None:
        """Return the pattern that matches the normalised `host`, or None."""
        if host in self.exact:
            return host
        for suffix in self.suffixes:
            if host.endswith(suffix):
                return "*" + suffix
        return None


def _compile(option: str, patterns: tuple[str, ...]) -> _Patterns:
    exact = set()
    suffixes = []
    for pattern in patterns:
        wildcard = pattern.startswith(WILDCARD_PREFIX)
        name = pattern.removeprefix(WILDCARD_PREFIX) if wildcard else pattern
        # normalize_host would strip these from a requested host, but in a pattern they are
        # a mistake that would widen or change what the pattern matches.
        if any(char in "@:[]" for char in name):
            raise ValueError(
                f"{option}: invalid host pattern {pattern!r}: "
                "userinfo, ports and brackets are not allowed in patterns"
            )
        try:
            normalised = normalize_host(name)
        except HostInvalid as exc:
            raise ValueError(
                f"{option}: invalid host pattern {pattern!r}: {exc.problem}; "
                "expected a host name or '*.' followed by one"
            ) from exc
        if parse_ip_literal(normalised) is not None or parse_ip_literal(name) is not None:
            raise ValueError(
                f"{option}: host pattern {pattern!r} is an IP literal; "
                "list it in allow_ip_literals instead"
            )
        if wildcard:
            suffixes.append("." + normalised)
        else:
            exact.add(normalised)
    return _Patterns(exact=frozenset(exact), suffixes=tuple(suffixes))


def _parse_allowed_literal(text: str) -> IPv4Address | IPv6Address:
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    problem = (
        f"allow_ip_literals: invalid IP address {text!r}; "
        "expected dotted-quad IPv4 or standard IPv6 notation without a zone id"
    )
    # ipaddress accepts zone ids (`fe80::1%eth0`) since Python 3.9, and parse_ip_literal does not.
    if "%" in bare:
        raise ValueError(problem)
    try:
        return ip_address(bare)
    except ValueError as exc:
        raise ValueError(problem) from exc


@dataclass(frozen=True, kw_only=True)
class DomainPolicy:
    """The hosts one agent may reach, validated at construction.

    `allowed` and `blocked` hold host names (`example.test`, matching that name only) and
    wildcards (`*.example.test`, matching every name below it at any depth but not
    `example.test` itself, so that allowing subdomains never silently allows the apex).
    A blocked match beats an allowed one. With `allowed` empty and `blocked` set (blocklist
    mode), every host not blocked is allowed, and only `decide_addresses` keeps internal
    addresses out. With both empty, every host is denied. `allow_ip_literals` lists IP
    addresses that may be requested directly. Raises `ValueError` naming the first invalid
    pattern or address.
    """

    allowed: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    allow_ip_literals: tuple[str, ...] = ()
    _allowed_patterns: _Patterns = field(init=False, repr=False, compare=False)
    _blocked_patterns: _Patterns = field(init=False, repr=False, compare=False)
    _allowed_addresses: frozenset[IPv4Address | IPv6Address] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # A str is a tuple of characters to a careless caller; each would become a pattern.
        for option in ("allowed", "blocked", "allow_ip_literals"):
            if not isinstance(getattr(self, option), tuple):
                raise TypeError(f"{option} must be a tuple of strings")

        # The dataclass is frozen, so the compiled forms are set through object.__setattr__.
        object.__setattr__(self, "_allowed_patterns", _compile("allowed", self.allowed))
        object.__setattr__(self, "_blocked_patterns", _compile("blocked", self.blocked))
        addresses = frozenset(_parse_allowed_literal(text) for text in self.allow_ip_literals)
        object.__setattr__(self, "_allowed_addresses", addresses)

    def decide(self, host: str) -> Decision:
        """Decide whether the agent may request `host`, as sent in CONNECT, Host or a URL.

        IP literals in any spelling are denied unless listed in `allow_ip_literals`, and a
        listed one must still pass `classify`. Names are then checked against the blocklist
        and the allowlist.
        """
        try:
            normalised = normalize_host(host)
        except HostInvalid as exc:
            return Decision.deny(Reason.HOST_INVALID, str(exc))

        # The raw text is parsed too, in case normalisation changed what a resolver would see.
        literal = parse_ip_literal(normalised) or parse_ip_literal(host)
        if literal is not None:
            return self._decide_literal(host, literal)

        blocked_by = self._blocked_patterns.match(normalised)
        if blocked_by is not None:
            return Decision.deny(
                Reason.HOST_BLOCKED, f"{normalised!r} matches blocked pattern {blocked_by!r}"
            )

        return self._decide_name(normalised)

    def _decide_name(self, normalised: str) -> Decision:
        if not self.allowed:
            if not self.blocked:
                # Neither list configured: an operator who set no policy gets no egress.
                return Decision.deny(
                    Reason.HOST_NOT_ALLOWED, f"{normalised!r}: no allowlist or blocklist is set"
                )
            return Decision.allow(f"{normalised!r} is not blocked and no allowlist is set")
        allowed_by = self._allowed_patterns.match(normalised)
        if allowed_by is None:
            return Decision.deny(
                Reason.HOST_NOT_ALLOWED, f"{normalised!r} matches no allowed pattern"
            )
        return Decision.allow(f"{normalised!r} matches allowed pattern {allowed_by!r}")

    def _decide_literal(self, host: str, literal: IPv4Address | IPv6Address) -> Decision:
        if literal not in self._allowed_addresses:
            return Decision.deny(
                Reason.IP_LITERAL_DENIED,
                f"{host!r} is the IP literal {literal}, which allow_ip_literals does not list",
            )
        return classify(literal)

    def decide_addresses(self, addresses: Iterable[IPv4Address | IPv6Address]) -> Decision:
        """Decide whether the proxy may connect for a DNS answer with these addresses.

        The whole answer is denied if any address is denied, with that address's reason, so
        an answer that mixes a public and a link-local address cannot win a race between
        them. An empty answer is denied as `no_addresses`.
        """
        checked = 0
        for address in addresses:
            decision = classify(address)
            if not decision.allowed:
                return decision
            checked += 1

        if checked == 0:
            return Decision.deny(Reason.NO_ADDRESSES, "the DNS answer has no addresses")
        return Decision.allow(f"all {checked} addresses are in no denied range")
