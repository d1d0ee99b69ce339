"""Gateway settings: listening address, API keys, timeouts and body limits."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ByteSize, Field, SecretStr

from libs.common.settings import CommonSettings

MIB = 1024 * 1024


class ApiSettings(CommonSettings):
    """Everything the REST gateway needs; agent limits themselves are the supervisor's."""

    development_defaults: ClassVar[dict[str, Any]] = {"allow_http_image_urls": True}

    listen_address: IPv4Address = Field(
        IPv4Address("127.0.0.1"),
        description="Address the gateway listens on. Until TLS is configured in front of it, "
        "keep it on loopback.",
    )
    listen_port: int = Field(8080, ge=1, le=65535, description="TCP port of the gateway.")
    api_keys_file: Path | None = Field(
        None,
        description="File of hashed API keys, one '<key id>:sha256:<hex>' line each, as "
        "written by 'agent-runner keys create'.",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated plain API keys, for setups without a key file; prefer "
        "the environment variable to the flag, which other users can see in the process list.",
    )
    request_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds the gateway waits for an agent to connect, respond or send more "
        "of its response when forwarding a request.",
    )
    max_request_body: ByteSize = Field(
        ByteSize(64 * 1024),
        description="Largest body of a control request such as POST /v1/agents (bytes).",
    )
    max_passthrough_body: ByteSize = Field(
        ByteSize(10 * MIB), description="Largest request body forwarded to an agent (bytes)."
    )
    max_passthrough_response: ByteSize = Field(
        ByteSize(100 * MIB),
        description="Largest agent response forwarded to the caller (bytes); a longer one is "
        "cut off and the connection closed.",
    )
    max_container_lifetime: int = Field(
        3600,
        gt=0,
        le=7 * 24 * 3600,
        description="Maximum lifetime a request may ask for, in seconds; keep it equal to the "
        "supervisor's --max-container-lifetime.",
    )
    start_wait_timeout: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="Seconds POST /v1/agents?wait=true waits for the agent to be ready.",
    )
    max_listed_agents: int = Field(
        1000, gt=0, le=100_000, description="Most agents GET /v1/agents returns."
    )
    allow_http_image_urls: bool = Field(
        False,
        description="Accept plain http:// image URLs. Development profile: true. Keep it equal "
        "to the supervisor's setting.",
    )
