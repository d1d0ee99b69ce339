"""Fixtures shared by the unit tests, which need no Docker, NATS or Redis."""

from __future__ import annotations

import os

import pytest

from libs.common.settings import ENV_PREFIX


@pytest.fixture(autouse=True)
def clean_settings_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every AGENT_RUNNER_* variable so that settings come from each test alone.

    The host id default is the machine's hostname, which need not match the host id pattern,
    so it is fixed here.
    """
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv(f"{ENV_PREFIX}HOST_ID", "unit-host")
