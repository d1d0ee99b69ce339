"""The gVisor wrapper runtime under a real dockerd: what it runs, what it rejects, what it leaves.

scripts/deps.sh installs Debian's runsc and registers runtime/runsc_agent_runner.py with
Docker as the runtime `runsc`.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from tests.support.images import build_busybox_image

pytestmark = pytest.mark.integration

RUNTIME = "runsc"
RUNSC = "/usr/bin/runsc"
HOST_PROC_VERSION = Path("/proc/version").read_text().strip()


@pytest.fixture(scope="module")
def busybox_image(docker_client: docker.DockerClient) -> Iterator[str]:
    runtimes = docker_client.info().get("Runtimes") or {}
    assert RUNTIME in runtimes, f"dockerd has no runtime {RUNTIME!r}; run scripts/deps.sh"
    image_id = build_busybox_image(docker_client, entrypoint=None, cmd=["true"])
    yield image_id
    docker_client.images.remove(image_id, force=True)


def processes_naming(container_id: str, *, executable: str | None = None) -> list[int]:
    """Return the pids of processes with the container id in their arguments.

    With `executable`, only processes running that program count, such as runsc's sandbox
    and gofer; without it, containerd's shim counts too.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            program = os.readlink(f"/proc/{entry}/exe")
            arguments = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if executable is not None and program != executable:
            continue
        if container_id.encode() in arguments:
            pids.append(int(entry))
    return pids


def runsc_processes(container_id: str) -> list[int]:
    """Return the pids of runsc processes (sandbox, gofer) of a container."""
    return processes_naming(container_id, executable=RUNSC)


def docker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_runsc_container_sees_gvisor_kernel(busybox_image: str) -> None:
    completed = docker_cli(
        "run",
        "--rm",
        f"--runtime={RUNTIME}",
        "--network=none",
        busybox_image,
        "cat",
        "/proc/version",
    )

    assert completed.returncode == 0, completed.stderr
    kernel = completed.stdout.strip()
    assert kernel
    assert kernel != HOST_PROC_VERSION


def test_wrapper_rejects_host_network(
    busybox_image: str, docker_client: docker.DockerClient
) -> None:
    name = f"ar-runtime-hostnet-{uuid.uuid4().hex[:8]}"
    container = docker_client.containers.create(
        busybox_image, ["true"], name=name, runtime=RUNTIME, network_mode="host"
    )
    try:
        started = docker_cli("start", name)

        assert started.returncode != 0
        assert "runsc-agent-runner: rejected create:" in started.stderr
        assert "is the host's" in started.stderr
        container.reload()
        assert container.status == "created"
        assert runsc_processes(container.id) == []
    finally:
        container.remove(force=True)
    assert docker_client.containers.list(all=True, filters={"name": name}) == []


def test_wrapper_rejects_host_network_run(
    busybox_image: str, docker_client: docker.DockerClient
) -> None:
    name = f"ar-runtime-hostnet-{uuid.uuid4().hex[:8]}"

    completed = docker_cli(
        "run",
        "--rm",
        "--name",
        name,
        f"--runtime={RUNTIME}",
        "--network=host",
        busybox_image,
        "true",
    )

    assert completed.returncode != 0
    assert "runsc-agent-runner: rejected create:" in completed.stderr
    assert docker_client.containers.list(all=True, filters={"name": name}) == []


def test_failed_start_leaves_no_sandbox(
    busybox_image: str, docker_client: docker.DockerClient
) -> None:
    # runsc creates the sandbox and gofer, then fails to start a missing program; without the
    # wrapper's cleanup both processes would outlive `docker rm`.
    container = docker_client.containers.create(
        busybox_image, ["/nonexistent"], runtime=RUNTIME, network_mode="none"
    )
    try:
        started = docker_cli("start", container.id)

        assert started.returncode != 0
        assert "/nonexistent" in started.stderr
        assert runsc_processes(container.id) == []
    finally:
        container.remove(force=True)
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)
    assert processes_naming(container.id) == []
