"""A setuid-root and a setgid-root helper in an agent image gain no privileges.

The image is imported from a tar that records both helpers as owned by root with mode 4755
and 2755, and a root-only file next to them. The agent's arguments make the kernel ignore
both bits (no-new-privileges), and the control run without no-new-privileges shows that the
bits are intact and would otherwise work.
"""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.support.hardened import (
    ImageFile,
    RunResult,
    compile_static,
    hardened_arguments,
    import_image,
    remove_image,
    run_to_completion,
)
from tests.support.stack import agent_runtime

pytestmark = pytest.mark.integration

AGENT_UID = "65534"
SETUID_HELPER = "/usr/local/bin/setuid-probe"
SETGID_HELPER = "/usr/local/bin/setgid-probe"


@pytest.fixture(scope="module")
def helper_image(
    docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = compile_static("setuid_probe.c", tmp_path_factory.mktemp("setuid") / "probe")
    content = binary.read_bytes()
    image_id = import_image(
        docker_client,
        [
            ImageFile(path=SETUID_HELPER.lstrip("/"), content=content, mode=0o4755),
            ImageFile(path=SETGID_HELPER.lstrip("/"), content=content, mode=0o2755),
            ImageFile(path="etc/root-only", content=b"root only\n", mode=0o600),
        ],
    )
    yield image_id
    remove_image(docker_client, image_id)


def run_helper(
    client: docker.DockerClient, image_id: str, helper: str, *, no_new_privileges: bool = True
) -> RunResult:
    arguments = hardened_arguments(image_id, name="setuid")
    if not no_new_privileges:
        arguments["security_opt"] = [
            option for option in arguments["security_opt"] if option != "no-new-privileges:true"
        ]
    result = run_to_completion(client, arguments, [helper])
    assert result.exit_code == 0, result.output
    return result


def test_image_keeps_setuid_bits(docker_client: docker.DockerClient, helper_image: str) -> None:
    arguments = hardened_arguments(helper_image, name="setuid-stat")

    result = run_to_completion(
        docker_client, arguments, ["stat", "-c", "%n %a %u %g", SETUID_HELPER, SETGID_HELPER]
    )

    assert result.output.splitlines() == [f"{SETUID_HELPER} 4755 0 0", f"{SETGID_HELPER} 2755 0 0"]


def test_setuid_helper_keeps_agent_user(
    docker_client: docker.DockerClient, helper_image: str
) -> None:
    results = run_helper(docker_client, helper_image, SETUID_HELPER).results()

    assert results["uid"] == AGENT_UID
    assert results["euid"] == AGENT_UID
    assert results["open-root-only"] == "EACCES"
    assert results["setuid-0"] == "EPERM"
    assert results["setgid-0"] == "EPERM"


def test_setgid_helper_keeps_agent_group(
    docker_client: docker.DockerClient, helper_image: str
) -> None:
    results = run_helper(docker_client, helper_image, SETGID_HELPER).results()

    assert results["gid"] == AGENT_UID
    assert results["egid"] == AGENT_UID
    assert results["open-root-only"] == "EACCES"


def test_setuid_without_no_new_privileges(
    docker_client: docker.DockerClient, helper_image: str
) -> None:
    # Under runc, without no-new-privileges the same helper runs as root and reads the
    # root-only file, so the test image really carries a working setuid-root binary. gVisor
    # (runsc 0.0~20221219) ignores the bit even then, so there the helper stays unprivileged.
    results = run_helper(
        docker_client, helper_image, SETUID_HELPER, no_new_privileges=False
    ).results()

    assert results["uid"] == AGENT_UID
    if agent_runtime() == "runc":
        assert results["euid"] == "0"
        assert results["open-root-only"] == "ok"
    else:
        assert results["euid"] == AGENT_UID
        assert results["open-root-only"] == "EACCES"
