"""Netguard settings: the sandbox network it guards and the proxy ports it lets agents reach."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Self

from pydantic import Field, model_validator

from libs.common.settings import SandboxProxySettings


class NetguardSettings(SandboxProxySettings):
    """Everything netguard needs to build, apply and check the sandbox firewall."""

    disable_firewall: bool = Field(
        False,
        description="UNSAFE: run without the firewall, so agents reach the internet, the host "
        "and each other. Rejected by the production profile; logged as a warning and "
        "audited at every start, and shown as 'firewall: disabled' in the published state.",
    )
    firewall_table: str = Field(
        "agent_runner",
        pattern=r"^[a-z][a-z0-9_]{0,31}$",
        description="Name of netguard's nftables tables (inet and bridge). Each netguard on a "
        "host needs its own.",
    )
    sandbox_bridge: str = Field(
        "ar-sandbox0",
        pattern=r"^[A-Za-z0-9_.-]{1,15}$",
        description="Linux bridge interface of the sandbox network; keep it equal to the "
        "supervisor's.",
    )
    metrics_address: IPv4Address = Field(
        IPv4Address("127.0.0.1"),
        description="Address of netguard's Prometheus metrics (firewall state, drift, packets "
        "per rule). Keep it internal: the metrics show what agents attempt.",
    )
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="Port of netguard's metrics; 0 turns them off."
    )
    firewall_check_interval: float = Field(
        5.0,
        gt=0,
        le=300,
        description="Seconds between comparisons of the live ruleset with the expected one; "
        "drift is repaired at the next check.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.disable_firewall and self.profile == "production":
            raise ValueError(
                "--disable-firewall is rejected by the production profile; agents would reach "
                "the internet, the host and each other. Use --profile development to test "
                "without it"
            )
        return self
