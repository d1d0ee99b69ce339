"""The seccomp profile applied to every agent: loading it and checking what it allows.

The supervisor loads the profile once at startup and passes it to Docker with each container
(container_spec.py), so a daemon configured without a profile still confines agents. The
profile shipped in profiles/seccomp.json is Docker 20.10's default for a container without
capabilities, less the syscall families in DENIED_FAMILIES. docs/runtime-hardening.md
explains why each family is denied. Any other profile passed with --seccomp-profile must
deny those families too, unless --unsafe-allow-seccomp-families accepts it with a warning
per syscall.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.common.errors import ConfigurationError

logger = logging.getLogger(__name__)

SHIPPED_PROFILE = Path(__file__).resolve().parent / "profiles" / "seccomp.json"

# Actions that make the kernel run the syscall (SCMP_ACT_TRACE and SCMP_ACT_NOTIFY hand the
# decision to another process, which may allow it) and actions that stop it.
PERMITTING_ACTIONS = frozenset(
    {"SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_NOTIFY"}
)
DENYING_ACTIONS = frozenset(
    {
        "SCMP_ACT_ERRNO",
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_TRAP",
    }
)

# Syscall families that no agent needs and that the shipped profile denies with EPERM, so a
# program that tries one fails cleanly instead of being killed.
DENIED_FAMILIES: dict[str, tuple[str, ...]] = {
    "mount": (
        "mount",
        "umount",
        "umount2",
        "pivot_root",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "mount_setattr",
        "chroot",
    ),
    "kernel-modules": ("init_module", "finit_module", "delete_module", "create_module"),
    "keyring": ("keyctl", "add_key", "request_key"),
    "bpf": ("bpf",),
    "perf": ("perf_event_open",),
    "ptrace": (
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "kcmp",
        "pidfd_getfd",
        "process_madvise",
    ),
    "userfaultfd": ("userfaultfd",),
    "io-uring": ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    "kexec": ("kexec_load", "kexec_file_load"),
    "namespaces": ("unshare", "setns"),
    "clock": (
        "clock_settime",
        "clock_settime64",
        "clock_adjtime",
        "clock_adjtime64",
        "settimeofday",
        "stime",
        "adjtimex",
    ),
    "host-administration": (
        "swapon",
        "swapoff",
        "reboot",
        "acct",
        "quotactl",
        "quotactl_fd",
        "name_to_handle_at",
        "open_by_handle_at",
        "lookup_dcookie",
        "syslog",
        "vhangup",
        "iopl",
        "ioperm",
        "modify_ldt",
        "sethostname",
        "setdomainname",
        "fanotify_init",
        "nfsservctl",
        "uselib",
        "_sysctl",
        "sysfs",
        "ustat",
    ),
}

# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
# | CLONE_NEWNET, from <linux/sched.h>.
CLONE_NAMESPACE_FLAGS = 0x7E020000

# Fixed reason codes of the findings below; the warning log and the tests use them.
REASON_FAMILY_ALLOWED = "family_allowed"
REASON_CLONE_NAMESPACES = "clone_namespace_flags_allowed"
REASON_CLONE3_NOT_ENOSYS = "clone3_not_enosys"


@dataclass(frozen=True, kw_only=True)
class SeccompFinding:
    """A syscall that a profile allows although agents must not have it."""

    family: str
    syscall: str
    reason: str

    def describe(self) -> str:
        """Return the finding as one sentence for errors and logs."""
        if self.reason == REASON_CLONE_NAMESPACES:
            return (
                "it allows clone without a SCMP_CMP_MASKED_EQ filter that requires the "
                f"namespace flags {CLONE_NAMESPACE_FLAGS:#x} to be clear"
            )
        if self.reason == REASON_CLONE3_NOT_ENOSYS:
            return (
                "clone3 needs an SCMP_ACT_ERRNO rule with errnoRet 38 (ENOSYS): seccomp "
                "cannot inspect its flags, and libc falls back to clone only on ENOSYS"
            )
        return f"it allows {self.syscall!r} of the denied family {self.family!r}"


def load_seccomp_profile(path: Path | None, *, allow_unsafe: bool = False) -> str:
    """Read and check a seccomp profile; return it as compact JSON for Docker.

    path None means the profile shipped with the supervisor. Raises ConfigurationError when
    the file is missing, not JSON, malformed, allows every syscall by default, or allows a
    syscall of DENIED_FAMILIES. With allow_unsafe, the last case logs one warning per
    finding instead.
    """
    path = path or SHIPPED_PROFILE
    try:
        profile = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read --seccomp-profile {str(path)!r}: {exc.strerror}; point the option "
            "at a readable profile, or leave it unset to use the shipped one"
        ) from exc
    except ValueError as exc:
        raise ConfigurationError(f"--seccomp-profile {str(path)!r} is not JSON: {exc}") from exc

    default_action = profile.get("defaultAction") if isinstance(profile, dict) else None
    if default_action not in DENYING_ACTIONS:
        raise ConfigurationError(
            f"--seccomp-profile {str(path)!r} has defaultAction {default_action!r}; expected a "
            "profile that denies unlisted syscalls (SCMP_ACT_ERRNO or a kill action)"
        )
    if not profile.get("syscalls"):
        raise ConfigurationError(
            f"--seccomp-profile {str(path)!r} allows no syscall, so no agent could start; "
            "expected a 'syscalls' list such as the one in the shipped profile"
        )

    findings = find_forbidden_syscalls(profile, source=str(path))
    if findings and not allow_unsafe:
        raise ConfigurationError(
            f"--seccomp-profile {str(path)!r} is rejected because {findings[0].describe()}"
            f" ({len(findings)} such findings in all); deny these syscalls with "
            "SCMP_ACT_ERRNO, or pass --unsafe-allow-seccomp-families to accept the profile"
        )
    for finding in findings:
        logger.warning(
            "--unsafe-allow-seccomp-families accepts --seccomp-profile %r although %s",
            str(path),
            finding.describe(),
            extra={"reason": finding.reason, "syscall": finding.syscall},
        )
    return json.dumps(profile, separators=(",", ":"))


@functools.lru_cache(maxsize=4)
def profile_for_runtime(profile: str, runtime: str) -> str:
    """Return the profile JSON that agents get under `runtime` ("runc" or "runsc").

    Under runc it is the profile unchanged. gVisor's runsc (Debian's 0.0~20221219, tested)
    returns EPERM for every SCMP_ACT_ERRNO rule whatever its errnoRet, so the clone3 rule
    would make glibc 2.34 and later fail to start threads instead of falling back to clone.
    Under runsc the clone3 rules therefore become SCMP_ACT_ALLOW: that runsc does not
    implement clone3 and returns ENOSYS itself.
    """
    if runtime != "runsc":
        return profile
    parsed = json.loads(profile)
    for rule in parsed["syscalls"]:
        names = rule.get("names", [rule.get("name")])
        if names == ["clone3"] and rule.get("action") == "SCMP_ACT_ERRNO":
            # NOTE: a runsc that implements clone3 would let it create namespaces, inside
            # gVisor's own kernel rather than the host's.
            rule["action"] = "SCMP_ACT_ALLOW"
            rule.pop("errnoRet", None)
    return json.dumps(parsed, separators=(",", ":"))


def find_forbidden_syscalls(profile: dict[str, Any], *, source: str) -> list[SeccompFinding]:
    """Return every syscall of DENIED_FAMILIES that the profile may let through.

    A rule counts as allowing a syscall whatever its "includes" conditions (capabilities,
    architectures, kernel version), because those depend on the host and on options that
    may change. Raises ConfigurationError, naming the profile `source`, for a rule that is
    not an object, has no list of syscall names, or has an unknown action.
    """
    permitted: dict[str, list[dict[str, Any]]] = {}
    clone3_enosys = False
    for index, rule in enumerate(profile["syscalls"]):
        names, action = _parse_rule(rule, index=index, source=source)
        for name in names:
            if action in PERMITTING_ACTIONS:
                permitted.setdefault(name, []).append(rule)
        if "clone3" in names and action == "SCMP_ACT_ERRNO":
            clone3_enosys = rule.get("errnoRet") == errno.ENOSYS

    findings = [
        SeccompFinding(family=family, syscall=name, reason=REASON_FAMILY_ALLOWED)
        for family, names in DENIED_FAMILIES.items()
        for name in names
        if name in permitted
    ]
    if any(not _clone_filter_clears_namespaces(rule) for rule in permitted.get("clone", [])):
        findings.append(
            SeccompFinding(family="namespaces", syscall="clone", reason=REASON_CLONE_NAMESPACES)
        )
    if "clone3" in permitted or not clone3_enosys:
        findings.append(
            SeccompFinding(family="namespaces", syscall="clone3", reason=REASON_CLONE3_NOT_ENOSYS)
        )
    return findings


def _parse_rule(rule: Any, *, index: int, source: str) -> tuple[list[str], str]:
    if not isinstance(rule, dict):
        raise ConfigurationError(
            f"--seccomp-profile {source!r}: syscalls[{index}] is {rule!r}, expected an object"
        )
    # Docker accepts the older single "name" key as well as "names".
    names = rule.get("names", [rule["name"]] if "name" in rule else None)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigurationError(
            f"--seccomp-profile {source!r}: syscalls[{index}] has names {names!r}, expected a "
            "list of syscall names"
        )
    action = rule.get("action")
    if action not in PERMITTING_ACTIONS | DENYING_ACTIONS:
        raise ConfigurationError(
            f"--seccomp-profile {source!r}: syscalls[{index}] has unknown action {action!r}; "
            f"expected one of {sorted(PERMITTING_ACTIONS | DENYING_ACTIONS)}"
        )
    return names, action


def _clone_filter_clears_namespaces(rule: dict[str, Any]) -> bool:
    # The kernel passes clone's flags in argument 0 on x86-64 and arm64, the architectures
    # of the shipped profile; s390 swaps the first two arguments.
    for condition in rule.get("args") or []:
        if (
            isinstance(condition, dict)
            and condition.get("index") == 0
            and condition.get("op") == "SCMP_CMP_MASKED_EQ"
            and isinstance(condition.get("value"), int)
            and condition["value"] & CLONE_NAMESPACE_FLAGS == CLONE_NAMESPACE_FLAGS
            and condition.get("valueTwo", 0) == 0
        ):
            return True
    return False
