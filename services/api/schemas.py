"""Request and response bodies of the REST API; strict, bounded and documented in OpenAPI."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

import idna
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from libs.common.messages import (
    MAX_ALLOWED_DOMAINS,
    MAX_SIGNATURE_LENGTH,
    AgentRecord,
    AgentState,
    DomainPattern,
    EnvName,
    HostId,
    ImageDigest,
    LogCounts,
    LogLine,
    PurgedImage,
    ResourceUsage,
    SkippedImage,
    StopReason,
    check_bundle_size,
)

MAX_DOMAIN_LENGTH = 253
# The largest --max-container-lifetime the gateway accepts; the route checks the configured one.
MAX_LIFETIME_SECONDS = 7 * 24 * 3600
WILDCARD_PREFIX = "*."
# Maximum number of characters of an entry that an error message shows; the rest is cut off.
_SHOWN_CHARACTERS = 80
_domain_pattern: TypeAdapter[str] = TypeAdapter(DomainPattern)
# The last label of an IPv4 literal in any spelling that inet_aton or a URL parser accepts
# (decimal, octal, hex). No top-level domain is numeric, so no host name ends in one.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def _shown(value: str) -> str:
    if len(value) <= _SHOWN_CHARACTERS:
        return repr(value)
    return f"{value[:_SHOWN_CHARACTERS]!r}... ({len(value)} characters)"


def _pattern_problem(value: str) -> str | None:
    """Return why `value` is not a domain pattern the network policy accepts, or None."""
    if len(value) > MAX_DOMAIN_LENGTH:
        return f"is {len(value)} characters long; the maximum is {MAX_DOMAIN_LENGTH}"
    try:
        _domain_pattern.validate_python(value)
    except ValidationError:
        return (
            "is not a host name or '*.' followed by one; expected dot-separated labels of 1 to "
            "63 lower-case ASCII letters, digits and inner hyphens"
        )
    if _NUMERIC_LABEL.fullmatch(value.rsplit(".", 1)[-1]):
        return "is an IP address or ends in a numeric label; list host names only"
    return None


def _canonical_spelling(value: str) -> str | None:
    """Return `value` in lower case, without one trailing dot and IDNA-encoded, if it encodes."""
    # UTS #46 drops some invisible characters, which would turn a suspicious entry into a
    # plausible suggestion; the proxy rejects them in host names too.
    if not value.isprintable():
        return None
    wildcard = value.startswith(WILDCARD_PREFIX)
    name = value.removeprefix(WILDCARD_PREFIX) if wildcard else value
    name = name.removesuffix(".")
    if name.isascii():
        name = name.lower()
    else:
        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except UnicodeError:  # idna.IDNAError derives from it
            return None
    return WILDCARD_PREFIX + name if wildcard else name


def _check_allowed_domain(value: str) -> str:
    # The entry is rejected rather than rewritten, so that the caller sees exactly what was
    # granted in the agent's record and in the proxy's decisions.
    problem = _pattern_problem(value)
    if problem is None:
        return value
    canonical = _canonical_spelling(value)
    if canonical is not None and canonical != value:
        canonical_problem = _pattern_problem(canonical)
        if canonical_problem is None:
            raise ValueError(
                f"allowed_domains entry {_shown(value)} is not in canonical form (lower-case "
                f"ASCII, no trailing dot); use {canonical!r}"
            )
        # Report what is still wrong after the spelling, such as an IP address.
        problem = canonical_problem
    raise ValueError(f"allowed_domains entry {_shown(value)} {problem}")


AllowedDomain = Annotated[str, AfterValidator(_check_allowed_domain)]


class CreateAgentRequest(BaseModel):
    """Start an agent from a `docker save` tarball at `image_url` whose SHA-256 is known."""

    model_config = ConfigDict(extra="forbid")

    image_url: Annotated[str, StringConstraints(min_length=8, max_length=2048)] = Field(
        description="https:// URL of the image tarball (http:// only in the development profile).",
        # Documents the shape that _check_url accepts, so generated clients and schema-based
        # tests produce URLs; the validator's messages stay the ones clients see.
        json_schema_extra={"pattern": r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[!-~]*)?$"},
    )
    image_digest: ImageDigest = Field(
        description="'sha256:' and the 64 lower-case hex digits of the tarball's SHA-256."
    )
    lifetime_seconds: int | None = Field(
        None,
        gt=0,
        le=MAX_LIFETIME_SECONDS,
        description="Seconds the agent may run; at most the gateway's --max-container-lifetime "
        "(default: that maximum).",
    )
    env: dict[EnvName, Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Environment variables for the agent (at most 64, values up to 4096 "
        "characters). They are not stored in the agent record.",
    )
    allowed_domains: list[AllowedDomain] = Field(
        default_factory=list,
        max_length=MAX_ALLOWED_DOMAINS,
        description="Host names the agent may reach through the egress proxy, in addition to "
        "the proxy's --allowed-domains; the proxy's --blocked-domains still apply. Each entry "
        "is a lower-case ASCII host name without a trailing dot (IDNA 'xn--' form for "
        "non-ASCII names), or '*.' and one, which matches every name below it but not the "
        "name itself. IP addresses are rejected. At most 256 entries.",
    )
    image_signature: (
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_SIGNATURE_LENGTH)] | None
    ) = Field(
        None,
        description="Base64 signature of the tarball by `cosign sign-blob --key` (ECDSA P-256 "
        "or Ed25519), checked against the supervisor's --image-signing-key.",
    )
    image_bundle: dict[str, Any] | None = Field(
        None,
        description="Sigstore bundle of the tarball (`cosign sign-blob --bundle`), checked "
        "offline against the supervisor's trusted root, identity and issuer. At most 64 KiB "
        "of JSON. Give it or image_signature, not both.",
    )

    _check_bundle = field_validator("image_bundle")(check_bundle_size)

    @field_validator("image_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"image_url {_shown(value)} must be an absolute https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError("image_url must not contain credentials")
        if any(ord(char) < 0x21 or ord(char) == 0x7F for char in value):
            raise ValueError("image_url must not contain spaces or control characters")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(
                f"image_url {_shown(value)} has an invalid port; use a number from 1 to 65535"
            )
        return value

    @field_validator("env")
    @classmethod
    def _check_env_values(cls, value: dict[str, str]) -> dict[str, str]:
        # A C string ends at NUL, so the agent would see a different value from the record.
        for name, text in value.items():
            if "\x00" in text:
                raise ValueError(f"env value of {name} contains a NUL character")
        return value


class AgentView(BaseModel):
    """An agent as the API shows it."""

    agent_id: str
    state: AgentState
    image_url: str
    image_digest: str
    image_id: str | None
    host_id: str | None
    container_id: str | None
    lifetime_seconds: int
    created_at: datetime
    started_at: datetime | None
    ready_at: datetime | None
    expires_at: datetime | None
    stopped_at: datetime | None
    exit_code: int | None
    stop_reason: StopReason | None
    killed_for_time: bool
    resource_usage: ResourceUsage | None = None
    failure_reason: str | None
    failure_message: str | None
    allowed_domains: list[str]
    image_signer: str | None = None

    @classmethod
    def of(cls, record: AgentRecord) -> AgentView:
        """Return the public view of a stored record."""
        return cls.model_validate(
            record.model_dump(exclude={"host_address", "host_port", "correlation_id"})
        )


class AgentList(BaseModel):
    """Agents, newest first."""

    agents: list[AgentView]


class AgentLogs(BaseModel):
    """Sanitised output of an agent, oldest line first.

    `counts` has the totals since the container started (lines read, stored, dropped by the
    log rate limit, truncated, redacted); it is null for agents whose output was not collected.
    """

    agent_id: str
    lines: list[LogLine]
    counts: LogCounts | None = None


class Health(BaseModel):
    """Minimal liveness response, which reveals nothing about the deployment."""

    status: str


class PurgeCacheRequest(BaseModel):
    """Evict one cached image (`digest`) or every one, on one host or on all of them."""

    model_config = ConfigDict(extra="forbid")

    digest: ImageDigest | None = Field(
        None,
        description="'sha256:' and the 64 hex digits of the tarball to evict; omit it to "
        "evict every cached image.",
    )
    host_id: HostId | None = Field(
        None, description="Host whose cache to purge; omit it for every host with cached images."
    )


class HostError(BaseModel):
    """Error of a host whose supervisor did not purge its cache."""

    code: str
    message: str


class HostPurge(BaseModel):
    """Purge result of one host; images in use by an agent are skipped."""

    host_id: str
    purged: list[PurgedImage]
    skipped: list[SkippedImage]
    error: HostError | None = None


class CachePurgeResult(BaseModel):
    """Result of a purge, one item per host asked."""

    hosts: list[HostPurge]
