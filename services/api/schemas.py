"""Request and response bodies of the REST API; strict, bounded and documented in OpenAPI."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from libs.common.messages import (
    AgentRecord,
    AgentState,
    EnvName,
    ImageDigest,
    LogLine,
    StopReason,
)


class CreateAgentRequest(BaseModel):
    """Start an agent from a `docker save` tarball at `image_url` whose SHA-256 is known."""

    model_config = ConfigDict(extra="forbid")

    image_url: Annotated[str, StringConstraints(min_length=8, max_length=2048)] = Field(
        description="https:// URL of the image tarball (http:// only in the development profile)."
    )
    image_digest: ImageDigest = Field(
        description="'sha256:' and the 64 lower-case hex digits of the tarball's SHA-256."
    )
    lifetime_seconds: int | None = Field(
        None,
        gt=0,
        description="Seconds the agent may run; at most the gateway's --max-container-lifetime "
        "(default: that maximum).",
    )
    env: dict[EnvName, Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Environment variables for the agent (at most 64, values up to 4096 "
        "characters). They are not stored in the agent record.",
    )

    @field_validator("image_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"image_url {value!r} must be an absolute https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError("image_url must not contain credentials")
        if any(ord(char) < 0x21 or ord(char) == 0x7F for char in value):
            raise ValueError("image_url must not contain spaces or control characters")
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
    failure_reason: str | None
    failure_message: str | None

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
    """Sanitised output of an agent, oldest line first."""

    agent_id: str
    lines: list[LogLine]


class Health(BaseModel):
    """Minimal liveness response, which reveals nothing about the deployment."""

    status: str
