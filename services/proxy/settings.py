"""Proxy settings: where it listens, what agents may reach, and the limits on their traffic."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from libs.common.settings import SandboxProxySettings
from services.proxy.policy import DomainPolicy


class ProxySettings(SandboxProxySettings):
    """Everything the egress proxy needs to decide, limit and audit agents' requests."""

    listen_wait: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="Seconds to wait at start for the sandbox gateway address to appear (the "
        "supervisor's sandbox network creates it) before giving up.",
    )
    allowed_domains: list[str] = Field(
        default_factory=list,
        description="Hosts every agent may reach: names (example.test) and wildcards "
        "(*.example.test, subdomains only). An agent's own allowlist from its start request "
        "is added to this one. With neither this nor --blocked-domains set, nothing is "
        "reachable.",
    )
    blocked_domains: list[str] = Field(
        default_factory=list,
        description="Hosts no agent may reach, same syntax; a block always beats an allow. "
        "Set alone, it turns on blocklist mode: every host not listed is allowed, internal "
        "addresses stay denied.",
    )
    allow_ip_literals: list[str] = Field(
        default_factory=list,
        description="IP addresses agents may request directly; the address checks still apply.",
    )
    allowed_ports: list[int] = Field(
        default_factory=lambda: [80, 443],
        description="Destination ports agents may reach through the explicit proxy.",
    )
    upstream_dns: list[IPv4Address] = Field(
        default_factory=list,
        description="Resolvers the proxy asks for allowed names (default: the nameservers in "
        "/etc/resolv.conf). Agents never talk to them directly.",
    )
    upstream_dns_port: int = Field(53, ge=1, le=65535, description="Port of --upstream-dns.")
    dns_timeout: float = Field(
        3.0, gt=0, le=30, description="Seconds the proxy waits for one upstream DNS answer."
    )
    dns_cache_seconds: int = Field(
        30,
        ge=0,
        le=3600,
        description="Maximum time a checked DNS answer is reused, and the maximum TTL given to "
        "agents; shorter upstream TTLs win, 0 turns the cache off.",
    )
    max_request_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Largest request head (request line "
        "and headers) an agent may send; larger gets 431.",
    )
    max_request_body_bytes: int = Field(
        10 * 1024 * 1024,
        ge=0,
        description="Largest request body an agent may send, counted as it arrives whatever "
        "Content-Length says; larger gets 413.",
    )
    rate_window_seconds: float = Field(
        60.0, gt=0, le=3600, description="Length of the window the per-agent limits count in."
    )
    max_requests_per_window: int = Field(
        600, ge=1, description="HTTP requests and TLS connections one agent may open per window."
    )
    max_bytes_per_window: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="Bytes one agent may move through the proxy per window, both ways.",
    )
    max_dns_queries_per_window: int = Field(
        300, ge=1, description="DNS queries one agent may send per window."
    )
    tls_inspection: bool = Field(
        False,
        description="Decrypt agents' HTTPS with a CA the proxy generates in --confdir, and "
        "require Host to match the TLS server name. Agents must trust that CA. Off by "
        "default: TLS is passed through unread and checked by its server name only.",
    )
    confdir: Path = Field(
        Path("/var/lib/agent-runner/proxy"),
        description="Folder of the proxy's generated CA (used only with --tls-inspection).",
    )
    upstream_ca_file: Path | None = Field(
        None,
        description="PEM bundle the proxy trusts for upstream servers with --tls-inspection "
        "(default: the certifi bundle).",
    )

    @model_validator(mode="after")
    def _check_policy(self) -> Self:
        try:
            DomainPolicy(
                allowed=tuple(self.allowed_domains),
                blocked=tuple(self.blocked_domains),
                allow_ip_literals=tuple(self.allow_ip_literals),
            )
        except ValueError as exc:
            raise ValueError(f"domain settings: {exc}") from exc
        bad_ports = [port for port in self.allowed_ports if not 1 <= port <= 65535]
        if bad_ports:
            raise ValueError(f"--allowed-ports {bad_ports} are not TCP ports (1 to 65535)")
        return self
