"""Tests for the seccomp profile check that the supervisor runs at startup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from libs.common.errors import ConfigurationError
from services.supervisor.main import load_seccomp_profile

SYSCALLS = [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]


def write_profile(directory: Path, profile: Any) -> Path:
    path = directory / "seccomp.json"
    path.write_text(json.dumps(profile, indent=2))
    return path


@pytest.mark.parametrize(
    "default_action",
    ["SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD"],
)
def test_denying_profile_accepted(tmp_path: Path, default_action: str) -> None:
    profile = {"defaultAction": default_action, "syscalls": SYSCALLS}

    loaded = load_seccomp_profile(write_profile(tmp_path, profile))

    assert json.loads(loaded) == profile


def test_profile_returned_compact(tmp_path: Path) -> None:
    path = write_profile(tmp_path, {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": SYSCALLS})

    loaded = load_seccomp_profile(path)

    assert loaded == json.dumps(json.loads(path.read_text()), separators=(",", ":"))
    assert "\n" not in loaded


def test_missing_profile_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(tmp_path / "absent.json")

    assert "--seccomp-profile" in str(error.value)
    assert "scripts/deps.sh" in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("{defaultAction: SCMP_ACT_ERRNO}", id="not-json"),
        pytest.param('{"defaultAction": "SCMP_ACT_ERRNO"', id="cut-off"),
    ],
)
def test_non_json_profile_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "seccomp.json"
    path.write_text(text)

    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(path)

    assert "is not JSON" in str(error.value)


def test_binary_profile_rejected(tmp_path: Path) -> None:
    path = tmp_path / "seccomp.json"
    path.write_bytes(b"\xff\xfe\x00")

    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(path)

    assert "--seccomp-profile" in str(error.value)


@pytest.mark.parametrize(
    "profile",
    [
        pytest.param({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": SYSCALLS}, id="allow"),
        pytest.param({"defaultAction": "SCMP_ACT_LOG", "syscalls": SYSCALLS}, id="log"),
        pytest.param({"defaultAction": "SCMP_ACT_TRACE", "syscalls": SYSCALLS}, id="trace"),
        pytest.param({"defaultAction": "scmp_act_errno", "syscalls": SYSCALLS}, id="lower-case"),
        pytest.param({"syscalls": SYSCALLS}, id="no-default"),
        pytest.param([{"defaultAction": "SCMP_ACT_ERRNO"}], id="list"),
        pytest.param("SCMP_ACT_ERRNO", id="string"),
    ],
)
def test_permissive_default_rejected(tmp_path: Path, profile: Any) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(write_profile(tmp_path, profile))

    assert "defaultAction" in str(error.value)


@pytest.mark.parametrize("syscalls", [None, []])
def test_profile_without_syscalls_rejected(tmp_path: Path, syscalls: Any) -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": syscalls}

    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(write_profile(tmp_path, profile))

    assert "syscalls" in str(error.value)
