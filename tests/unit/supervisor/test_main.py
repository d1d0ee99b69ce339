"""Tests for the supervisor's startup checks of agent confinement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.supervisor import metrics
from services.supervisor.apparmor import AppArmorState
from services.supervisor.main import load_confinement
from services.supervisor.seccomp import SHIPPED_PROFILE
from services.supervisor.settings import SupervisorSettings

RUNC = ["--runtime=runc", "--no-require-gvisor"]


@pytest.mark.skipif(Path("/sys/module/apparmor").exists(), reason="this kernel has AppArmor")
def test_confinement_without_apparmor() -> None:
    metrics.APPARMOR_ENFORCED.set(1)

    seccomp_profile, apparmor = load_confinement(load_settings(SupervisorSettings, RUNC))

    assert json.loads(seccomp_profile) == json.loads(SHIPPED_PROFILE.read_text())
    assert apparmor.state == AppArmorState.UNSUPPORTED
    assert apparmor.profile is None
    assert metrics.REGISTRY.get_sample_value("agent_runner_apparmor_enforced") == 0


def test_confinement_rejects_permissive_profile(tmp_path: Path) -> None:
    profile = json.loads(SHIPPED_PROFILE.read_text())
    profile["syscalls"].append({"names": ["bpf"], "action": "SCMP_ACT_ALLOW"})
    path = tmp_path / "seccomp.json"
    path.write_text(json.dumps(profile))
    settings = load_settings(SupervisorSettings, [*RUNC, f"--seccomp-profile={path}"])

    with pytest.raises(ConfigurationError) as error:
        load_confinement(settings)

    assert "allows 'bpf' of the denied family 'bpf'" in str(error.value)


def test_confinement_unsafe_flag_accepts(tmp_path: Path) -> None:
    profile = json.loads(SHIPPED_PROFILE.read_text())
    profile["syscalls"].append({"names": ["bpf"], "action": "SCMP_ACT_ALLOW"})
    path = tmp_path / "seccomp.json"
    path.write_text(json.dumps(profile))
    flags = [*RUNC, f"--seccomp-profile={path}", "--unsafe-allow-seccomp-families"]

    seccomp_profile, _ = load_confinement(load_settings(SupervisorSettings, flags))

    assert json.loads(seccomp_profile) == profile
