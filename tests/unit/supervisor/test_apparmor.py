"""Tests for the AppArmor startup check, on fake /sys trees.

The test machine's kernel has no AppArmor, so the enforced path is covered only here.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from libs.common.errors import ConfigurationError
from services.supervisor.apparmor import (
    REASON_DISABLED,
    REASON_MODULE_ABSENT,
    REASON_PROFILE_ENFORCED,
    REASON_SECURITYFS_ABSENT,
    SHIPPED_PROFILE,
    AppArmorState,
    check_apparmor,
    detect_apparmor,
)

PROFILE = "agent-runner-agent"


def fake_sys(
    root: Path, *, enabled: str | None = "Y", securityfs: bool = True, profiles: str | None = ""
) -> Path:
    """Build a /sys tree: module parameter, securityfs folder and its profiles list."""
    if enabled is not None:
        parameters = root / "module" / "apparmor" / "parameters"
        parameters.mkdir(parents=True)
        (parameters / "enabled").write_text(f"{enabled}\n")
    if securityfs:
        apparmor = root / "kernel" / "security" / "apparmor"
        apparmor.mkdir(parents=True)
        if profiles is not None:
            (apparmor / "profiles").write_text(profiles)
    return root


@pytest.mark.parametrize(
    ("enabled", "securityfs", "reason"),
    [
        pytest.param(None, False, REASON_MODULE_ABSENT, id="no-module"),
        pytest.param(None, True, REASON_MODULE_ABSENT, id="securityfs-without-module"),
        pytest.param("N", True, REASON_DISABLED, id="disabled"),
        pytest.param("", True, REASON_DISABLED, id="empty-parameter"),
        pytest.param("Y", False, REASON_SECURITYFS_ABSENT, id="no-securityfs"),
    ],
)
def test_unsupported_kernel_detected(
    tmp_path: Path, enabled: str | None, securityfs: bool, reason: str
) -> None:
    root = fake_sys(tmp_path, enabled=enabled, securityfs=securityfs)

    status = detect_apparmor(PROFILE, sys_root=root)

    assert status.state == AppArmorState.UNSUPPORTED
    assert status.reason == reason
    assert status.profile is None


def test_this_host_without_apparmor() -> None:
    # The test machine's kernel has no AppArmor module; skip where it has one.
    if Path("/sys/module/apparmor").exists():
        pytest.skip("this kernel has AppArmor")

    status = detect_apparmor(PROFILE)

    assert status.state == AppArmorState.UNSUPPORTED
    assert status.reason == REASON_MODULE_ABSENT


def test_loaded_profile_enforced(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, profiles=f"docker-default (enforce)\n{PROFILE} (enforce)\n")

    status = detect_apparmor(PROFILE, sys_root=root)

    assert status.state == AppArmorState.ENFORCED
    assert status.reason == REASON_PROFILE_ENFORCED
    assert status.profile == PROFILE
    assert status.as_details() == {
        "state": "enforced",
        "reason": REASON_PROFILE_ENFORCED,
        "profile": PROFILE,
    }


@pytest.mark.parametrize(
    "profiles",
    [
        pytest.param("", id="none-loaded"),
        pytest.param("docker-default (enforce)\n", id="other-profile"),
        pytest.param(f"{PROFILE} (complain)\n", id="complain-mode"),
        pytest.param(f"{PROFILE}-old (enforce)\n", id="prefix-only"),
    ],
)
def test_profile_not_enforced_rejected(tmp_path: Path, profiles: str) -> None:
    root = fake_sys(tmp_path, profiles=profiles)

    with pytest.raises(ConfigurationError) as error:
        detect_apparmor(PROFILE, sys_root=root)

    assert f"profile {PROFILE!r} is not loaded in enforce mode" in str(error.value)
    assert f"apparmor_parser -r -W {SHIPPED_PROFILE}" in str(error.value)


def test_unreadable_profiles_rejected(tmp_path: Path) -> None:
    # A folder in place of the file fails to read even for root, unlike a chmod.
    root = fake_sys(tmp_path, profiles=None)
    (root / "kernel" / "security" / "apparmor" / "profiles").mkdir()

    with pytest.raises(ConfigurationError) as error:
        detect_apparmor(PROFILE, sys_root=root)

    assert "cannot read" in str(error.value)
    assert "profiles" in str(error.value)


def test_unreadable_parameter_rejected(tmp_path: Path) -> None:
    (tmp_path / "module" / "apparmor" / "parameters" / "enabled").mkdir(parents=True)

    with pytest.raises(ConfigurationError) as error:
        detect_apparmor(PROFILE, sys_root=tmp_path)

    assert "cannot read" in str(error.value)
    assert "enabled" in str(error.value)


def test_check_logs_unsupported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="services.supervisor.apparmor"):
        status = check_apparmor(PROFILE, sys_root=tmp_path)

    assert status.state == AppArmorState.UNSUPPORTED
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert getattr(caplog.records[0], "reason", None) == REASON_MODULE_ABSENT
    assert "without an AppArmor profile" in caplog.records[0].getMessage()


def test_check_logs_enforced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = fake_sys(tmp_path, profiles=f"{PROFILE} (enforce)\n")

    with caplog.at_level(logging.INFO, logger="services.supervisor.apparmor"):
        check_apparmor(PROFILE, sys_root=root)

    assert [record.levelno for record in caplog.records] == [logging.INFO]
    assert PROFILE in caplog.records[0].getMessage()


def test_shipped_profile_named_like_default() -> None:
    text = SHIPPED_PROFILE.read_text()

    assert f"profile {PROFILE} flags=" in text


@pytest.mark.skipif(shutil.which("apparmor_parser") is None, reason="apparmor_parser missing")
def test_shipped_profile_compiles() -> None:
    # -S compiles to a binary policy on standard output without loading it into a kernel,
    # so it checks the syntax and the rules on a host without AppArmor too.
    result = subprocess.run(
        ["apparmor_parser", "-S", str(SHIPPED_PROFILE)],
        capture_output=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout
