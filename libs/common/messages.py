"""Versioned message schemas for every NATS subject, and the agent record kept in Redis.

Services never import each other; they agree on these models. Every model rejects unknown
fields and unknown schema versions, so a message from a newer or tampered sender fails
loudly instead of being half understood.

Subjects (version 1):

| subject | pattern | payload |
|---|---|---|
| `agents.v1.start` | request/reply, queue `supervisor` | StartAgentRequest -> StartAgentReply |
| `agents.v1.host.<host>.stop` | request/reply | StopAgentRequest -> AgentRecordReply |
| `agents.v1.host.<host>.logs` | request/reply | LogsRequest -> LogsReply |
| `agents.v1.host.<host>.cache` | request/reply | CachePurgeRequest -> CachePurgeReply |
| `agents.v1.host.<host>.runtime` | request/reply | RuntimeStatusRequest -> RuntimeStatusReply |
| `agents.v1.state.<agent>` | publish | AgentStateChanged |
| `audit.<service>.<type>` | JetStream stream `AUDIT` | AuditEvent |
| `proxy.v1.host.<host>.state` | publish | ProxyState |

Any request may instead get an ErrorReply.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

SCHEMA_VERSION: Literal[1] = 1

SUBJECT_START = "agents.v1.start"
START_QUEUE_GROUP = "supervisor"
AUDIT_STREAM = "AUDIT"
AUDIT_SUBJECTS = "audit.>"

CorrelationId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
AgentId = Annotated[str, StringConstraints(pattern=r"^ag-[0-9a-f]{32}$")]
ImageDigest = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
HostId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
# A host name in lower case without a trailing dot, or "*." and one, which matches the names
# below it but not the name itself.
DomainPattern = Annotated[
    str,
    StringConstraints(
        max_length=253,
        pattern=r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
    ),
]
MAX_ALLOWED_DOMAINS = 256
# A cosign signature is about 100 base64 characters; a Sigstore bundle a few kilobytes.
MAX_SIGNATURE_LENGTH = 1024
MAX_BUNDLE_BYTES = 64 * 1024


def new_agent_id() -> str:
    """Return a fresh agent id; 128 random bits, so ids cannot be guessed or enumerated."""
    return f"ag-{uuid.uuid4().hex}"


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def host_subject(host_id: str, operation: Literal["stop", "logs", "cache", "runtime"]) -> str:
    """Return the request subject that reaches the supervisor on `host_id`."""
    return f"agents.v1.host.{host_id}.{operation}"


def state_subject(agent_id: str) -> str:
    """Return the subject on which the supervisor publishes an agent's state changes."""
    return f"agents.v1.state.{agent_id}"


def _exact_version(value: Any) -> Any:
    # Pydantic's lax mode would take true or 1.0 for Literal[1]; a version is an integer.
    if type(value) is not int:
        raise ValueError(f"schema_version must be the integer 1, got {value!r}")
    return value


class Message(BaseModel):
    """Base of every NATS payload: versioned, strict and traceable by correlation id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    correlation_id: CorrelationId

    _check_version = field_validator("schema_version", mode="before")(_exact_version)


class AgentState(StrEnum):
    """Lifecycle state of an agent, in the order an agent normally passes through them."""

    REQUESTED = "requested"
    PULLING = "pulling"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


ACTIVE_STATES = frozenset(
    {
        AgentState.REQUESTED,
        AgentState.PULLING,
        AgentState.STARTING,
        AgentState.READY,
        AgentState.STOPPING,
    }
)
FINAL_STATES = frozenset({AgentState.STOPPED, AgentState.FAILED})


class StopReason(StrEnum):
    """Reason an agent's container ended.

    `requested` means killed by an operator (DELETE /v1/agents/{id}). The value predates the
    limit reasons and is kept so that existing clients keep working.
    """

    REQUESTED = "requested"
    LIFETIME_EXCEEDED = "lifetime_exceeded"
    EXITED = "exited"
    FAILED = "failed"
    OUT_OF_MEMORY = "out_of_memory"
    PIDS_LIMIT_REACHED = "pids_limit_reached"
    DISK_LIMIT_REACHED = "disk_limit_reached"


class ResourceUsage(BaseModel):
    """Resources an agent's container used, as last measured before it was removed.

    None means the supervisor could not measure that resource (no sample was taken, or the
    runtime keeps no such counter).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The memory cgroup's high-water mark, page cache and tmpfs included (bytes).
    memory_peak_bytes: int | None = None
    cpu_seconds: float | None = None
    pids_peak: int | None = None
    # Largest sampled use of each tmpfs mount point, such as "/tmp" (bytes).
    disk_peak_bytes: dict[str, int] = Field(default_factory=dict)
    oom_kills: int = 0
    # Forks and clones that the pids limit refused.
    pids_limit_hits: int = 0


class AgentRecord(BaseModel):
    """Everything known about one agent; stored in Redis and returned by the API."""

    model_config = ConfigDict(extra="forbid")

    agent_id: AgentId
    state: AgentState
    image_url: str
    image_digest: ImageDigest
    lifetime_seconds: int
    correlation_id: CorrelationId
    created_at: datetime
    host_id: HostId | None = None
    image_id: str | None = None
    container_id: str | None = None
    host_address: str | None = None
    host_port: int | None = None
    sandbox_address: str | None = None
    started_at: datetime | None = None
    ready_at: datetime | None = None
    expires_at: datetime | None = None
    stopped_at: datetime | None = None
    exit_code: int | None = None
    stop_reason: StopReason | None = None
    killed_for_time: bool = False
    resource_usage: ResourceUsage | None = None
    failure_reason: str | None = None
    failure_message: str | None = None
    allowed_domains: list[str] = Field(default_factory=list)
    # Who signed the image: "key sha256:<fingerprint>", "sigstore <identity> (<issuer>)", or
    # "unsigned" where the development profile let an unsigned image run.
    image_signer: str | None = None


def check_bundle_size(bundle: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return `bundle` unless its JSON form is larger than MAX_BUNDLE_BYTES."""
    if bundle is not None:
        size = len(json.dumps(bundle, separators=(",", ":")).encode())
        if size > MAX_BUNDLE_BYTES:
            raise ValueError(
                f"image_bundle is {size} bytes of JSON; a Sigstore bundle is at most "
                f"{MAX_BUNDLE_BYTES} bytes"
            )
    return bundle


class StartAgentRequest(Message):
    """Ask any supervisor to download, verify and start an agent."""

    kind: Literal["start_agent"] = "start_agent"
    agent_id: AgentId
    image_url: Annotated[str, StringConstraints(max_length=2048)]
    image_digest: ImageDigest
    lifetime_seconds: int = Field(gt=0)
    env: dict[EnvName, Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=dict, max_length=64
    )
    allowed_domains: list[DomainPattern] = Field(
        default_factory=list, max_length=MAX_ALLOWED_DOMAINS
    )
    image_signature: Annotated[str, StringConstraints(max_length=MAX_SIGNATURE_LENGTH)] | None = (
        None
    )
    image_bundle: dict[str, Any] | None = None

    _check_bundle = field_validator("image_bundle")(check_bundle_size)


class StartAgentReply(Message):
    """The supervisor on `host_id` took the start request and works on it in the background."""

    kind: Literal["start_accepted"] = "start_accepted"
    agent_id: AgentId
    host_id: HostId


class StopAgentRequest(Message):
    """Ask the supervisor that runs an agent to stop it and remove its container."""

    kind: Literal["stop_agent"] = "stop_agent"
    agent_id: AgentId


class AgentRecordReply(Message):
    """An agent's record after the requested operation."""

    kind: Literal["agent_record"] = "agent_record"
    record: AgentRecord


class LogsRequest(Message):
    """Ask the supervisor that runs an agent for the last `tail` lines of its output."""

    kind: Literal["logs"] = "logs"
    agent_id: AgentId
    tail: int = Field(gt=0, le=10_000)


class LogStream(StrEnum):
    """The container stream a log line came from."""

    STDOUT = "stdout"
    STDERR = "stderr"


class LogLine(BaseModel):
    """One sanitised line of agent output, as a record that the agent cannot forge.

    The agent controls only `text`: a newline in its output starts a new record with the same
    agent, container and stream, so a line that imitates a supervisor message still shows
    where it came from. `agent_id` and `container_id` are None in lines kept by supervisors
    that predate the log collector.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stream: LogStream
    time: datetime | None
    text: str
    truncated: bool = False
    agent_id: AgentId | None = None
    container_id: str | None = None
    # Secrets replaced by a "[REDACTED:<kind>]" marker in `text`.
    redactions: int = Field(0, ge=0)
    # Lines of the same agent that the log rate limit dropped right before this one.
    dropped_before: int = Field(0, ge=0)


class LogCounts(BaseModel):
    """Totals of an agent's output since its container started, counted in lines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Lines read from the container, whether stored or dropped.
    lines: int = Field(ge=0)
    stored: int = Field(ge=0)
    # Lines over the per-agent rate limit (--log-rate-limit, --log-rate-burst), and lines lost
    # because Redis failed.
    dropped: int = Field(ge=0)
    # Stored lines cut at --log-max-line-length.
    truncated: int = Field(ge=0)
    # Stored lines with at least one secret redacted.
    redacted: int = Field(ge=0)


class LogsReply(Message):
    """Sanitised output of an agent's container; `counts` is None for agents without totals."""

    kind: Literal["logs_reply"] = "logs_reply"
    agent_id: AgentId
    container_id: str
    lines: list[LogLine]
    counts: LogCounts | None = None


class CachePurgeRequest(Message):
    """Ask a host's supervisor to evict one cached image (`digest`), or every one when None.

    Images that an agent of the host still uses are skipped, never evicted.
    """

    kind: Literal["cache_purge"] = "cache_purge"
    digest: ImageDigest | None = None


class PurgedImage(BaseModel):
    """A cached image that a purge evicted, with its tarball's size in bytes.

    `image_removed` is false when the loaded Docker image was kept because a container or
    another cached digest still uses it, or because it was not loaded.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    digest: ImageDigest
    size: int = Field(ge=0)
    image_removed: bool


class PurgeSkipReason(StrEnum):
    """Reason a purge left an image alone."""

    IN_USE = "in_use"
    NOT_CACHED = "not_cached"
    FAILED = "failed"  # the tarball could not be deleted, and the supervisor logged why


class SkippedImage(BaseModel):
    """An image that a purge did not evict, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    digest: ImageDigest
    reason: PurgeSkipReason


class CachePurgeReply(Message):
    """Images that the supervisor on `host_id` evicted and images that it skipped."""

    kind: Literal["cache_purge_reply"] = "cache_purge_reply"
    host_id: HostId
    purged: list[PurgedImage]
    skipped: list[SkippedImage]


class RuntimeStatusRequest(Message):
    """Ask the supervisor on a host which runtime its agents use and what its probe found."""

    kind: Literal["runtime_status"] = "runtime_status"


class RuntimeStatusReply(Message):
    """The agents' OCI runtime on `host_id` and the result of its startup gVisor probe.

    `gvisor_status` is one of the probe's fixed codes, such as `available`, `not_registered`
    or `not_probed` (runc); see services/supervisor/runtime_probe.py.
    """

    kind: Literal["runtime_status_reply"] = "runtime_status_reply"
    host_id: HostId
    runtime: Literal["runc", "runsc"]
    docker_runtime: str = Field(max_length=64)
    gvisor_status: str = Field(max_length=64)


class ErrorReply(Message):
    """A request failed; `code` is a fixed reason code, `message` describes what failed and why."""

    kind: Literal["error"] = "error"
    code: str
    message: str


class AgentStateChanged(Message):
    """Published whenever the supervisor writes a new state to an agent's record."""

    kind: Literal["agent_state"] = "agent_state"
    record: AgentRecord


class AuditOutcome(StrEnum):
    """Result of an audited action."""

    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"
    INFO = "info"


class AuditEvent(BaseModel):
    """One audit record as published on `audit.<service>.<type>`; the schema is versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time: datetime = Field(default_factory=utc_now)
    service: str
    host: str
    type: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")]
    actor: str
    outcome: AuditOutcome
    agent_id: str | None = None
    correlation_id: str | None = None
    reason_code: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    _check_version = field_validator("schema_version", mode="before")(_exact_version)

    @property
    def subject(self) -> str:
        """Return the JetStream subject this event is published on."""
        return f"audit.{self.service}.{self.type}"


def firewall_state_subject(host_id: str) -> str:
    """Return the subject on which netguard publishes the firewall state of `host_id`."""
    return f"netguard.v1.host.{host_id}.state"


def firewall_agents_subject(host_id: str) -> str:
    """Return the request subject that registers agents with netguard on `host_id`."""
    return f"netguard.v1.host.{host_id}.agents"


class FirewallState(Message):
    """Netguard's latest check of the live ruleset, published every check interval.

    `enabled` false means netguard runs with --disable-firewall; `verified` true means the
    live tables equalled the expected ones at `checked_at`.
    """

    kind: Literal["firewall_state"] = "firewall_state"
    host_id: HostId
    enabled: bool
    verified: bool
    ruleset_hash: str | None
    checked_at: AwareDatetime
    check_interval: float = Field(gt=0, le=300, allow_inf_nan=False)
    detail: str = ""


class AgentNetworkPolicy(BaseModel):
    """Network policy of one agent, keyed by its sandbox address."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agent_id: AgentId
    address: str
    allowed_domains: list[DomainPattern] = Field(
        default_factory=list, max_length=MAX_ALLOWED_DOMAINS
    )

    @field_validator("address")
    @classmethod
    def _canonical_ipv4(cls, value: str) -> str:
        # Only the canonical dotted form: nft would read "010.0.0.1" as octal, and a set
        # element that differs from the registry looks like drift forever.
        try:
            canonical = str(IPv4Address(value))
        except ValueError as exc:
            raise ValueError(f"address {value!r} is not an IPv4 address") from exc
        if canonical != value:
            raise ValueError(f"address {value!r} is not in canonical form; use {canonical!r}")
        return value


class RegisterAgentRequest(Message):
    """Add (`add` true) or remove an agent's address and policy at netguard."""

    kind: Literal["register_agent"] = "register_agent"
    add: bool
    policy: AgentNetworkPolicy


class RegisterAgentReply(Message):
    """Netguard applied the registration; `agents` is how many it now holds."""

    kind: Literal["register_agent_reply"] = "register_agent_reply"
    agents: int


def proxy_state_subject(host_id: str) -> str:
    """Return the subject on which the egress proxy of `host_id` publishes that it runs."""
    return f"proxy.v1.host.{host_id}.state"


class ProxyState(Message):
    """The egress proxy's sign of life, published every `publish_interval` seconds.

    `running` is false in the last message of a proxy that stops. A proxy that stopped
    without one is recognised by its last message growing old.
    """

    kind: Literal["proxy_state"] = "proxy_state"
    host_id: HostId
    running: bool
    published_at: AwareDatetime
    publish_interval: float = Field(gt=0, le=300, allow_inf_nan=False)
