"""AppArmor for agents: whether the kernel enforces it and whether our profile is loaded.

The supervisor runs this once at startup. When the kernel has AppArmor enabled, every agent
gets the profile shipped in profiles/apparmor-agent (container_spec.py adds
`apparmor=<name>`), and a missing profile stops the supervisor, because Docker would
otherwise fall back to its own, weaker docker-default profile. The supervisor does not load
the profile itself, because loading needs CAP_MAC_ADMIN; scripts/deps.sh loads it with
apparmor_parser. When the kernel has no AppArmor, agents run without it and the supervisor
logs that once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from libs.common.errors import ConfigurationError

logger = logging.getLogger(__name__)

SHIPPED_PROFILE = Path(__file__).resolve().parent / "profiles" / "apparmor-agent"

# Fixed reason codes of an AppArmorStatus; the log line, the audit event and tests use them.
REASON_MODULE_ABSENT = "apparmor_module_absent"
REASON_DISABLED = "apparmor_disabled"
REASON_SECURITYFS_ABSENT = "apparmor_securityfs_absent"
REASON_PROFILE_ENFORCED = "apparmor_profile_enforced"


class AppArmorState(StrEnum):
    """Whether agents run confined by AppArmor."""

    ENFORCED = "enforced"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True, kw_only=True)
class AppArmorStatus:
    """The AppArmor result of the startup check, with the profile to apply, if any."""

    state: AppArmorState
    reason: str
    profile: str | None

    def as_details(self) -> dict[str, str | None]:
        """Return the status as audit-event details."""
        return {"state": self.state.value, "reason": self.reason, "profile": self.profile}


def detect_apparmor(profile: str, *, sys_root: Path = Path("/sys")) -> AppArmorStatus:
    """Check kernel support for AppArmor and, when present, that `profile` is enforced.

    Kernel support means what runc checks before it applies a profile (libcontainer/apparmor):
    securityfs shows /sys/kernel/security/apparmor and the module parameter `enabled` is "Y".
    Raises ConfigurationError when AppArmor is enabled but the profile is not loaded in
    enforce mode, or when a file that should be readable is not.
    """
    enabled_path = sys_root / "module" / "apparmor" / "parameters" / "enabled"
    try:
        enabled = enabled_path.read_text().strip()
    except FileNotFoundError:
        return _unsupported(REASON_MODULE_ABSENT)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {str(enabled_path)!r}: {exc.strerror}; the supervisor needs it to "
            "tell whether the kernel enforces AppArmor"
        ) from exc
    if enabled != "Y":
        return _unsupported(REASON_DISABLED)

    securityfs = sys_root / "kernel" / "security" / "apparmor"
    if not securityfs.is_dir():
        return _unsupported(REASON_SECURITYFS_ABSENT)

    profiles_path = securityfs / "profiles"
    try:
        loaded = profiles_path.read_text().splitlines()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {str(profiles_path)!r}: {exc.strerror}; run the supervisor as root "
            "so it can check that the AppArmor profile of agents is loaded"
        ) from exc
    if f"{profile} (enforce)" not in loaded:
        raise ConfigurationError(
            f"AppArmor is enabled but profile {profile!r} is not loaded in enforce mode; load "
            f"it with 'apparmor_parser -r -W {SHIPPED_PROFILE}' (scripts/deps.sh does this), "
            "or set --apparmor-profile to a loaded profile"
        )
    return AppArmorStatus(
        state=AppArmorState.ENFORCED, reason=REASON_PROFILE_ENFORCED, profile=profile
    )


def check_apparmor(profile: str, *, sys_root: Path = Path("/sys")) -> AppArmorStatus:
    """Run detect_apparmor and log its result in one line: INFO when enforced, else WARNING.

    Raises ConfigurationError as detect_apparmor does.
    """
    status = detect_apparmor(profile, sys_root=sys_root)
    if status.state == AppArmorState.ENFORCED:
        logger.info(
            "agents run under AppArmor profile %r", status.profile, extra={"reason": status.reason}
        )
        return status
    logger.warning(
        "AppArmor is not available on this host (%s), so agents run without an AppArmor "
        "profile; seccomp, no-new-privileges and dropped capabilities still apply",
        status.reason,
        extra={"reason": status.reason},
    )
    return status


def _unsupported(reason: str) -> AppArmorStatus:
    return AppArmorStatus(state=AppArmorState.UNSUPPORTED, reason=reason, profile=None)
