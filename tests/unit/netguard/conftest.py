"""Fixtures for the netguard unit tests: a ruleset config whose every value differs from
netguard's defaults, so that a hard-coded value cannot pass."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from services.netguard.ruleset import RulesetConfig


@pytest.fixture
def config() -> RulesetConfig:
    return RulesetConfig(
        table="ar_unit",
        bridge="ar-unit0",
        subnet=IPv4Network("10.77.0.0/24"),
        gateway=IPv4Address("10.77.0.1"),
        transparent_port=16001,
        dns_port=16053,
        explicit_port=16080,
    )
