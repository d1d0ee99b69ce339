"""The shipped seccomp profile inside real containers: denied families, working agents.

A static test program (tests/support/programs/sysprobe.c) tries each syscall family in a
container created with the supervisor's own arguments. Under runc the profile returns EPERM
for each denied family and ENOSYS for clone3. Under runsc (AGENT_RUNNER_TEST_RUNTIME=runsc)
gVisor leaves many of these syscalls unimplemented, so either errno counts as denied.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from services.supervisor.seccomp import SHIPPED_PROFILE, profile_for_runtime
from tests.integration.conftest import Tarball
from tests.support.hardened import (
    LABEL_TEST,
    ImageFile,
    RunResult,
    compile_static,
    hardened_arguments,
    import_image,
    remove_image,
    run_to_completion,
)
from tests.support.stack import VENV_BIN, Stack, agent_runtime

pytestmark = pytest.mark.integration

DENIED = {"EPERM", "ENOSYS"}
# Probe name, as sysprobe.c calls it, and the family of DENIED_FAMILIES it belongs to.
FAMILY_PROBES = [
    ("mount", "mount"),
    ("umount2", "mount"),
    ("pivot_root", "mount"),
    ("fsopen", "mount"),
    ("open_tree", "mount"),
    ("init_module", "kernel-modules"),
    ("finit_module", "kernel-modules"),
    ("delete_module", "kernel-modules"),
    ("keyctl", "keyring"),
    ("add_key", "keyring"),
    ("request_key", "keyring"),
    ("bpf", "bpf"),
    ("perf_event_open", "perf"),
    ("ptrace", "ptrace"),
    ("process_vm_readv", "ptrace"),
    ("process_vm_writev", "ptrace"),
    ("kcmp", "ptrace"),
    ("userfaultfd", "userfaultfd"),
    ("io_uring_setup", "io-uring"),
    ("kexec_load", "kexec"),
    ("kexec_file_load", "kexec"),
    ("unshare-user", "namespaces"),
    ("unshare-net", "namespaces"),
    ("setns", "namespaces"),
    ("clone-newuser", "namespaces"),
    ("clone-newnet", "namespaces"),
    ("clock_settime", "clock"),
    ("clock_adjtime", "clock"),
    ("adjtimex", "clock"),
    ("settimeofday", "clock"),
    ("syslog", "host-administration"),
    ("modify_ldt", "host-administration"),
    ("name_to_handle_at", "host-administration"),
    ("reboot", "host-administration"),
]
# What an ordinary agent does and must still be able to do.
ALLOWED_PROBES = ["getpid", "fork", "thread", "clone-plain", "personality-query"]
# Probes that succeed in the same container without a seccomp filter on any Linux kernel this
# project supports, so their denial comes from the profile, not from missing capabilities.
# Others (perf_event_open, userfaultfd, io_uring, user namespaces) also depend on sysctls.
PROFILE_ONLY_PROBES = [
    "open_tree",
    "keyctl",
    "add_key",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "clone3",
    "clock_adjtime",
    "adjtimex",
    "modify_ldt",
    "personality-no-aslr",
]
ALL_PROBES = [
    *(name for name, _ in FAMILY_PROBES),
    *ALLOWED_PROBES,
    "clone3",
    "personality-no-aslr",
    "compat-getpid",
]


@pytest.fixture(scope="module")
def probe_image(
    docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = compile_static("sysprobe.c", tmp_path_factory.mktemp("sysprobe") / "sysprobe")
    image_id = import_image(
        docker_client, [ImageFile(path="usr/local/bin/sysprobe", content=binary.read_bytes())]
    )
    yield image_id
    remove_image(docker_client, image_id)


@pytest.fixture(scope="module")
def confined(docker_client: docker.DockerClient, probe_image: str) -> RunResult:
    arguments = hardened_arguments(probe_image, name="seccomp")
    return run_to_completion(docker_client, arguments, ["sysprobe", *ALL_PROBES])


def test_probe_ran_every_syscall(confined: RunResult) -> None:
    assert confined.exit_code == 0, confined.output
    assert confined.results().keys() == set(ALL_PROBES), confined.output


@pytest.mark.parametrize(("probe", "family"), FAMILY_PROBES)
def test_family_denied(confined: RunResult, probe: str, family: str) -> None:
    result = confined.results()[probe]

    assert result in DENIED, f"{probe} of family {family!r} returned {result}"
    if agent_runtime() == "runc":
        # The profile's own errno, so programs fail cleanly instead of being killed.
        assert result == "EPERM", f"{probe} of family {family!r} returned {result}"


def test_clone3_returns_enosys(confined: RunResult) -> None:
    # ENOSYS, not EPERM: glibc falls back to clone only on ENOSYS.
    assert confined.results()["clone3"] == "ENOSYS"


def test_aslr_cannot_be_disabled(confined: RunResult) -> None:
    assert confined.results()["personality-no-aslr"] in DENIED


def test_32_bit_syscalls_blocked(confined: RunResult) -> None:
    # The profile lists no 32-bit ABI, so an int 0x80 syscall never reaches the kernel.
    result = confined.results()["compat-getpid"]

    assert result != "ok"
    if agent_runtime() == "runc":
        assert result == "killed-by-signal-31"  # SIGSYS, runc's action for a foreign ABI


@pytest.mark.parametrize("probe", ALLOWED_PROBES)
def test_ordinary_syscalls_work(confined: RunResult, probe: str) -> None:
    expected = "ok"
    if probe == "personality-query" and agent_runtime() == "runsc":
        expected = "EINVAL"  # runsc rejects personality(0xffffffff) even without a filter

    assert confined.results()[probe] == expected


@pytest.mark.skipif(
    agent_runtime() != "runc",
    reason="gVisor implements few of these calls even without a filter (open_tree and "
    "process_vm_writev give ENOSYS, adjtimex and modify_ldt EPERM), so the control needs runc",
)
def test_same_container_unconfined_allows(
    docker_client: docker.DockerClient, probe_image: str
) -> None:
    # The same arguments with seccomp=unconfined: these probes succeed, so their denial
    # above comes from the profile and the test program really makes the syscalls.
    arguments = hardened_arguments(probe_image, name="unconfined")
    arguments["security_opt"] = ["no-new-privileges:true", "seccomp=unconfined"]

    result = run_to_completion(docker_client, arguments, ["sysprobe", *PROFILE_ONLY_PROBES])

    results = result.results()
    assert {probe: results.get(probe) for probe in PROFILE_ONLY_PROBES} == dict.fromkeys(
        PROFILE_ONLY_PROBES, "ok"
    )


def test_echo_agent_runs_under_profile(
    api: httpx.Client, stack: Stack, echo_tarball: Tarball, docker_client: docker.DockerClient
) -> None:
    response = api.post(
        "/v1/agents",
        params={"wait": "true"},
        json={"image_url": echo_tarball.url, "image_digest": echo_tarball.digest},
    )
    assert response.status_code == 202, response.text
    agent = response.json()
    try:
        assert agent["state"] == "ready", agent
        container = docker_client.containers.get(agent["container_id"])
        options = container.attrs["HostConfig"]["SecurityOpt"]
        applied = [opt.removeprefix("seccomp=") for opt in options if opt.startswith("seccomp=")]
        expected = profile_for_runtime(SHIPPED_PROFILE.read_text(), agent_runtime())
        assert [json.loads(text) for text in applied] == [json.loads(expected)]

        reply = api.post(f"/v1/agents/{agent['agent_id']}/http/cgi-bin/echo", content=b"ping")
        assert reply.status_code == 200
        assert "ping" in reply.text

        status = container.exec_run(["cat", "/proc/1/status"]).output.decode()
        assert "Seccomp:\t2" in status
        if agent_runtime() == "runc":
            # runsc 0.0~20221219 applies the filter at `runsc run` only, not to `docker exec`.
            unshare = container.exec_run(["unshare", "-U", "true"])
            assert unshare.exit_code != 0
            assert b"Operation not permitted" in unshare.output
    finally:
        api.delete(f"/v1/agents/{agent['agent_id']}")


def test_supervisor_rejects_permissive_profile(tmp_path: Path, stack: Stack) -> None:
    profile = json.loads(SHIPPED_PROFILE.read_text())
    profile["syscalls"].append({"names": ["mount"], "action": "SCMP_ACT_ALLOW"})
    path = tmp_path / "permissive.json"
    path.write_text(json.dumps(profile))
    host_id = f"seccomp-{uuid.uuid4().hex[:8]}"
    environment = {**stack.env(), "AGENT_RUNNER_HOST_ID": host_id}

    result = subprocess.run(
        [
            str(VENV_BIN / "agent-runner-supervisor"),
            f"--seccomp-profile={path}",
            "--runtime=runc",
            "--no-require-gvisor",
            "--metrics-port=0",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1, result.stderr
    assert "allows 'mount' of the denied family 'mount'" in result.stderr
    assert "--unsafe-allow-seccomp-families" in result.stderr
    started = [event for event in stack.audit_events() if event.get("host") == host_id]
    assert started == [], "the supervisor started before rejecting the profile"


def test_no_test_container_left(docker_client: docker.DockerClient, confined: RunResult) -> None:
    left = docker_client.containers.list(all=True, filters={"label": f"{LABEL_TEST}=true"})

    assert left == []


def test_startup_audits_apparmor_status(stack: Stack) -> None:
    started = [
        event
        for event in stack.audit_events()
        if event["type"] == "service.started"
        and event["service"] == "supervisor"
        and event["host"] == stack.host_id
    ]

    assert started, "the stack's supervisor published no service.started event"
    apparmor = started[-1]["details"]["apparmor"]
    if Path("/sys/module/apparmor").exists():
        pytest.skip("this kernel has AppArmor; the test covers the unsupported path")
    assert apparmor == {"state": "unsupported", "reason": "apparmor_module_absent", "profile": None}
    assert "AppArmor is not available on this host" in stack.log_text("supervisor")
