"""Tests for the seccomp profile check that the supervisor runs at startup."""

from __future__ import annotations

import copy
import errno
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from libs.common.errors import ConfigurationError
from services.supervisor.seccomp import (
    CLONE_NAMESPACE_FLAGS,
    DENIED_FAMILIES,
    REASON_CLONE3_NOT_ENOSYS,
    REASON_CLONE_NAMESPACES,
    REASON_FAMILY_ALLOWED,
    SHIPPED_PROFILE,
    find_forbidden_syscalls,
    load_seccomp_profile,
    profile_for_runtime,
)

# Where scripts/deps.sh puts Docker 20.10's default profile, kept for comparison.
DOCKER_DEFAULT_PROFILE = Path("/usr/local/share/agent-runner/docker-default-seccomp.json")
CLONE3_ENOSYS = {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS}
SYSCALLS = [
    {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
    CLONE3_ENOSYS,
]
ALL_DENIED = [
    pytest.param(family, name, id=name)
    for family, names in DENIED_FAMILIES.items()
    for name in names
]


def write_profile(directory: Path, profile: Any) -> Path:
    path = directory / "seccomp.json"
    path.write_text(json.dumps(profile, indent=2))
    return path


def shipped_profile() -> dict[str, Any]:
    profile: dict[str, Any] = json.loads(SHIPPED_PROFILE.read_text())
    return profile


def permitted_names(profile: dict[str, Any]) -> set[str]:
    return {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW"
        for name in rule["names"]
    }


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
    assert "absent.json" in str(error.value)
    assert "leave it unset" in str(error.value)


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


def test_shipped_profile_is_default() -> None:
    loaded = load_seccomp_profile(None)

    assert json.loads(loaded) == shipped_profile()


def test_shipped_profile_has_no_findings() -> None:
    assert find_forbidden_syscalls(shipped_profile(), source="shipped") == []


@pytest.mark.parametrize(("family", "name"), ALL_DENIED)
def test_shipped_profile_denies_with_eperm(family: str, name: str) -> None:
    # Each family has its own SCMP_ACT_ERRNO rule returning EPERM, so a program gets a clean
    # error, and nothing in the profile allows the syscall.
    profile = shipped_profile()
    rules = [rule for rule in profile["syscalls"] if name in rule["names"]]

    assert len(rules) == 1
    assert rules[0]["action"] == "SCMP_ACT_ERRNO"
    assert rules[0]["errnoRet"] == errno.EPERM
    assert rules[0]["comment"].startswith(f"Denied family {family}:")


def test_shipped_family_rules_match_table() -> None:
    profile = shipped_profile()
    families = {
        rule["comment"].removeprefix("Denied family ").partition(":")[0]: tuple(rule["names"])
        for rule in profile["syscalls"]
        if rule["comment"].startswith("Denied family ")
    }

    assert families == DENIED_FAMILIES


def test_shipped_profile_defaults_to_eperm() -> None:
    profile = shipped_profile()

    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == errno.EPERM


def test_shipped_profile_native_architectures_only() -> None:
    # No 32-bit compatibility ABI: a syscall made through it does not match the filter's
    # architectures and is refused whatever its name.
    profile = shipped_profile()

    assert profile["archMap"] == [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []},
    ]


def test_shipped_profile_rules_not_capability_gated() -> None:
    # Agents run with no capabilities, so a rule gated on one would never apply and only
    # mislead a reader.
    profile = shipped_profile()

    assert [rule for rule in profile["syscalls"] if "caps" in rule.get("includes", {})] == []


@pytest.mark.skipif(
    not DOCKER_DEFAULT_PROFILE.exists(), reason="scripts/deps.sh did not install Docker's profile"
)
def test_shipped_profile_allows_subset_of_docker() -> None:
    docker_profile = json.loads(DOCKER_DEFAULT_PROFILE.read_text())
    docker_allowed = permitted_names(docker_profile)

    extra = permitted_names(shipped_profile()) - docker_allowed

    assert extra == set()


@pytest.mark.parametrize(("family", "name"), ALL_DENIED)
def test_profile_allowing_family_rejected(tmp_path: Path, family: str, name: str) -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [*SYSCALLS, {"names": [name], "action": "SCMP_ACT_ALLOW"}],
    }
    path = write_profile(tmp_path, profile)

    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(path)

    assert f"allows {name!r} of the denied family {family!r}" in str(error.value)
    assert str(path) in str(error.value)
    assert "--unsafe-allow-seccomp-families" in str(error.value)


@pytest.mark.parametrize(
    "action", ["SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_NOTIFY"]
)
def test_permitting_actions_count_as_allowing(action: str) -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [*SYSCALLS, {"names": ["bpf"], "action": action}],
    }

    findings = find_forbidden_syscalls(profile, source="test")

    assert [(f.syscall, f.reason) for f in findings] == [("bpf", REASON_FAMILY_ALLOWED)]


def test_capability_gated_rule_counts_as_allowing() -> None:
    # Docker's own default allows mount to containers with CAP_SYS_ADMIN; the check does not
    # rely on the capabilities of today's containers.
    rule = {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}}
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [*SYSCALLS, rule]}

    findings = find_forbidden_syscalls(profile, source="test")

    assert [(f.family, f.syscall) for f in findings] == [("mount", "mount")]


def test_single_name_key_checked() -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [*SYSCALLS, {"name": "ptrace", "action": "SCMP_ACT_ALLOW"}],
    }

    findings = find_forbidden_syscalls(profile, source="test")

    assert [(f.family, f.syscall) for f in findings] == [("ptrace", "ptrace")]


def clone_rule(args: Any) -> dict[str, Any]:
    return {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": args}


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(clone_rule(None), id="no-args"),
        pytest.param(clone_rule([]), id="empty-args"),
        pytest.param(
            clone_rule([{"index": 0, "value": 0x10000000, "op": "SCMP_CMP_MASKED_EQ"}]),
            id="only-newuser-clear",
        ),
        pytest.param(
            clone_rule([{"index": 1, "value": CLONE_NAMESPACE_FLAGS, "op": "SCMP_CMP_MASKED_EQ"}]),
            id="wrong-argument",
        ),
        pytest.param(
            clone_rule([{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "op": "SCMP_CMP_NE"}]),
            id="wrong-operator",
        ),
        pytest.param(
            clone_rule(
                [
                    {
                        "index": 0,
                        "value": CLONE_NAMESPACE_FLAGS,
                        "valueTwo": 0x10000000,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ]
            ),
            id="requires-newuser-set",
        ),
    ],
)
def test_clone_without_namespace_filter_rejected(tmp_path: Path, rule: dict[str, Any]) -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [*SYSCALLS, rule]}

    findings = find_forbidden_syscalls(profile, source="test")
    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(write_profile(tmp_path, profile))

    assert [(f.syscall, f.reason) for f in findings] == [("clone", REASON_CLONE_NAMESPACES)]
    assert "namespace flags 0x7e020000" in str(error.value)


def test_clone_with_namespace_filter_accepted() -> None:
    rule = clone_rule([{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "op": "SCMP_CMP_MASKED_EQ"}])
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [*SYSCALLS, rule]}

    assert find_forbidden_syscalls(profile, source="test") == []


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param([], id="missing"),
        pytest.param([{"names": ["clone3"], "action": "SCMP_ACT_ALLOW"}], id="allowed"),
        pytest.param(
            [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}],
            id="eperm",
        ),
        pytest.param([{"names": ["clone3"], "action": "SCMP_ACT_ERRNO"}], id="default-errno"),
        pytest.param(
            [CLONE3_ENOSYS, {"names": ["clone3"], "action": "SCMP_ACT_LOG"}], id="also-logged"
        ),
    ],
)
def test_clone3_without_enosys_rejected(tmp_path: Path, rules: list[dict[str, Any]]) -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}, *rules],
    }

    findings = find_forbidden_syscalls(profile, source="test")
    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(write_profile(tmp_path, profile))

    assert [(f.syscall, f.reason) for f in findings] == [("clone3", REASON_CLONE3_NOT_ENOSYS)]
    assert "errnoRet 38 (ENOSYS)" in str(error.value)


def test_unsafe_flag_accepts_with_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [*SYSCALLS, {"names": ["mount", "bpf"], "action": "SCMP_ACT_ALLOW"}],
    }

    with caplog.at_level(logging.WARNING, logger="services.supervisor.seccomp"):
        loaded = load_seccomp_profile(write_profile(tmp_path, profile), allow_unsafe=True)

    assert json.loads(loaded) == profile
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert [getattr(record, "syscall", None) for record in warnings] == ["mount", "bpf"]
    assert all(getattr(record, "reason", None) == REASON_FAMILY_ALLOWED for record in warnings)
    assert all("--unsafe-allow-seccomp-families" in record.getMessage() for record in warnings)


def test_unsafe_flag_silent_for_clean_profile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": SYSCALLS}

    with caplog.at_level(logging.WARNING, logger="services.supervisor.seccomp"):
        load_seccomp_profile(write_profile(tmp_path, profile), allow_unsafe=True)

    assert caplog.records == []


def test_error_counts_findings(tmp_path: Path) -> None:
    profile = copy.deepcopy(shipped_profile())
    profile["syscalls"].append({"names": ["keyctl", "add_key"], "action": "SCMP_ACT_ALLOW"})

    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(write_profile(tmp_path, profile))

    assert "allows 'keyctl' of the denied family 'keyring'" in str(error.value)
    assert "(2 such findings in all)" in str(error.value)


@pytest.mark.skipif(
    not DOCKER_DEFAULT_PROFILE.exists(), reason="scripts/deps.sh did not install Docker's profile"
)
def test_docker_default_profile_rejected() -> None:
    # Docker's default allows ptrace, io_uring and clock adjustment to every container and
    # mount, bpf and more to containers with capabilities.
    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(DOCKER_DEFAULT_PROFILE)

    assert "denied family" in str(error.value)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        pytest.param("read", "syscalls[2] is 'read', expected an object", id="string-rule"),
        pytest.param(
            {"names": "read", "action": "SCMP_ACT_ALLOW"},
            "syscalls[2] has names 'read', expected a list",
            id="names-string",
        ),
        pytest.param(
            {"names": [1], "action": "SCMP_ACT_ALLOW"},
            "syscalls[2] has names [1], expected a list",
            id="names-numbers",
        ),
        pytest.param(
            {"action": "SCMP_ACT_ALLOW"},
            "syscalls[2] has names None, expected a list",
            id="no-names",
        ),
        pytest.param(
            {"names": ["read"], "action": "SCMP_ACT_MAYBE"},
            "syscalls[2] has unknown action 'SCMP_ACT_MAYBE'",
            id="unknown-action",
        ),
    ],
)
def test_malformed_rule_rejected(tmp_path: Path, rule: Any, expected: str) -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [*SYSCALLS, rule]}
    path = write_profile(tmp_path, profile)

    with pytest.raises(ConfigurationError) as error:
        load_seccomp_profile(path)

    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_runc_profile_unchanged() -> None:
    profile = SHIPPED_PROFILE.read_text()

    assert profile_for_runtime(profile, "runc") == profile


def test_runsc_profile_allows_clone3() -> None:
    # runsc returns EPERM for every SCMP_ACT_ERRNO rule, which would break glibc's threads.
    original = shipped_profile()

    adapted = json.loads(profile_for_runtime(json.dumps(original), "runsc"))

    clone3_rules = [rule for rule in adapted["syscalls"] if "clone3" in rule["names"]]
    assert clone3_rules == [
        {"comment": clone3_rules[0]["comment"], "names": ["clone3"], "action": "SCMP_ACT_ALLOW"}
    ]
    others = [rule for rule in adapted["syscalls"] if "clone3" not in rule["names"]]
    assert others == [rule for rule in original["syscalls"] if "clone3" not in rule["names"]]
    assert {key: adapted[key] for key in adapted if key != "syscalls"} == {
        key: original[key] for key in original if key != "syscalls"
    }


def test_runsc_profile_differs_only_in_clone3() -> None:
    adapted = json.loads(profile_for_runtime(SHIPPED_PROFILE.read_text(), "runsc"))

    findings = find_forbidden_syscalls(adapted, source="runsc")

    assert [(f.syscall, f.reason) for f in findings] == [("clone3", REASON_CLONE3_NOT_ENOSYS)]
