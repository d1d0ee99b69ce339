"""First checks of a DNS query, run by the proxy's DNS filter before the domain policy.

An agent can carry data out in the question of a DNS query alone (DNS tunnelling), in a TXT,
NULL or similar record type, or in a name that the resolver forwards unchanged. The filter
therefore resolves only class IN queries for A and AAAA records, and only for names that
`normalize_host` accepts as host names. This module decides that, without any network access,
and leaves which names an agent may resolve to `DomainPolicy`.
"""

from __future__ import annotations

import dns.rdataclass
import dns.rdatatype

from libs.common.decisions import Decision, Reason
from libs.common.hosts import MAX_LABEL_LENGTH, MAX_NAME_LENGTH, HostInvalid, normalize_host

ALLOWED_TYPES = frozenset({dns.rdatatype.A, dns.rdatatype.AAAA})
ALLOWED_CLASS = dns.rdataclass.IN

# The name is attacker data and may be a tunnelling payload, so details echo only its start.
MAX_ECHOED_CHARACTERS = 80
# A problem reported by normalize_host may quote a label or an IDNA error about one.
MAX_PROBLEM_CHARACTERS = 160
# A wire name is at most 255 octets, and its presentation form is at most four times that with
# every octet escaped as `\DDD`. Longer text cannot come from a DNS message, so it is rejected
# before the IDNA encoder spends time on it.
MAX_INPUT_CHARACTERS = 4 * 255
# normalize_host reads these as userinfo, port and IPv6 brackets and strips them, so
# `payload@allowed.test` would be checked as `allowed.test`. No host name contains them.
_AUTHORITY_CHARACTERS = frozenset("@:[]")


class QueryNameInvalid(ValueError):
    """A DNS question name that is not a valid host name; `problem` names the reason."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"invalid DNS name {echo_name(name)}: {problem}")
        self.name = name
        self.problem = problem


def echo_name(name: str) -> str:
    """Quote `name` for a message, cut to `MAX_ECHOED_CHARACTERS` with its full length noted."""
    if len(name) <= MAX_ECHOED_CHARACTERS:
        return repr(name)
    return f"{name[:MAX_ECHOED_CHARACTERS]!r}... ({len(name)} characters)"


def _type_text(qtype: int) -> str:
    try:
        return f"{dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype))} ({qtype})"
    except ValueError:
        # make rejects numbers outside 0 to 65535, which no DNS message can carry.
        return f"invalid type number {qtype!r}"


def _class_text(qclass: int) -> str:
    try:
        return f"{dns.rdataclass.to_text(dns.rdataclass.RdataClass.make(qclass))} ({qclass})"
    except ValueError:
        return f"invalid class number {qclass!r}"


def _check_ascii_lengths(name: str, labels: list[str]) -> None:
    # normalize_host checks the same limits but echoes the whole label in its message. Labels
    # with non-ASCII characters are measured by the IDNA encoder inside normalize_host.
    for position, label in enumerate(labels, start=1):
        if label.isascii() and len(label) > MAX_LABEL_LENGTH:
            raise QueryNameInvalid(
                name,
                f"label {position} is {len(label)} octets, the maximum is {MAX_LABEL_LENGTH}",
            )

    presentation = ".".join(labels)
    if presentation.isascii() and len(presentation) > MAX_NAME_LENGTH:
        raise QueryNameInvalid(
            name,
            f"name is {len(presentation)} octets without the trailing dot, "
            f"the maximum is {MAX_NAME_LENGTH}",
        )


def normalized_query_name(name: str) -> str:
    """Return the lowercase ASCII (IDNA) form of a DNS question name, without a trailing dot.

    `name` is the question name as the DNS library returns it, in ASCII or Unicode, any case,
    with or without one trailing dot. Raises `QueryNameInvalid` for an empty name, empty
    labels, a label over 63 octets, a name over 253 octets, the characters `@:[]` and
    everything `normalize_host` rejects (including `_`, `*`, `\\` escapes and whitespace).
    Names spelled like IP literals (`127.0.0.1`) are valid DNS names and pass, and
    `DomainPolicy.decide` denies them.

    NOTE: UTS #46 drops some code points (variation selectors, for example) and maps others,
    so two different Unicode names can have the same result. The DNS filter must send the
    upstream query for the returned name, not for the original question, or the policy and
    the resolver could see different names.
    """
    if len(name) > MAX_INPUT_CHARACTERS:
        raise QueryNameInvalid(
            name, f"name is {len(name)} characters, the maximum is {MAX_NAME_LENGTH} octets"
        )
    for char in name:
        if char in _AUTHORITY_CHARACTERS:
            raise QueryNameInvalid(name, f"character {char!r} is not allowed in a DNS name")

    bare = name.removesuffix(".")
    if not bare:
        raise QueryNameInvalid(name, "empty name")
    labels = bare.split(".")
    for position, label in enumerate(labels, start=1):
        if not label:
            raise QueryNameInvalid(name, f"label {position} is empty")
    _check_ascii_lengths(name, labels)

    try:
        return normalize_host(name)
    except HostInvalid as exc:
        problem = exc.problem
        if len(problem) > MAX_PROBLEM_CHARACTERS:
            problem = problem[:MAX_PROBLEM_CHARACTERS] + "..."
        raise QueryNameInvalid(name, problem) from exc


def check_query(name: str, qtype: int, qclass: int) -> Decision:
    """Decide whether the DNS filter may continue with one query, before any policy check.

    Allows only class IN queries of type A (1) or AAAA (28) for a name that
    `normalized_query_name` accepts. Every other class or type, known or not, is denied with
    `dns_type_refused`, and an invalid name with `dns_name_invalid`. The type is checked
    first, so a refused type is reported even when the name is invalid too. An allowing
    decision names the normalised name; call `normalized_query_name` for the value itself.
    """
    if qclass != ALLOWED_CLASS:
        return Decision.deny(
            Reason.DNS_TYPE_REFUSED,
            f"query class {_class_text(qclass)} for {echo_name(name)} is refused; "
            "only class IN is allowed",
        )
    if qtype not in ALLOWED_TYPES:
        return Decision.deny(
            Reason.DNS_TYPE_REFUSED,
            f"query type {_type_text(qtype)} for {echo_name(name)} is refused; "
            "only A and AAAA queries are allowed",
        )

    try:
        normalised = normalized_query_name(name)
    except QueryNameInvalid as exc:
        return Decision.deny(Reason.DNS_NAME_INVALID, str(exc))

    return Decision.allow(f"{_type_text(qtype)} query for {normalised!r}")
