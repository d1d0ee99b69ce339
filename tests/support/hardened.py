"""Run small static test programs inside containers built by the supervisor's own arguments.

The seccomp, setuid and file-system tests compile a C program with `gcc -static` and import
it with busybox into an image. The image's tar keeps each file's mode and owner, setuid bits
included. Containers are created with container_spec.create_arguments, so the tests check
the arguments that agents really get. Only the network is replaced by "none", together with
the DNS settings and mounts that serve it, because these containers need no sandbox network.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from docker.errors import NotFound

from libs.common.settings import load_settings
from services.supervisor.container_spec import AgentContainer, create_arguments
from services.supervisor.gvisor_options import RESOLV_CONF
from services.supervisor.seccomp import load_seccomp_profile
from services.supervisor.settings import SupervisorSettings
from tests.support.images import BUSYBOX
from tests.support.stack import runtime_args

PROGRAMS = Path(__file__).resolve().parent / "programs"
# Seconds a test container may run before the test fails.
RUN_TIMEOUT = 60
LABEL_TEST = "io.agent-runner.test"


@dataclass(frozen=True, kw_only=True)
class ImageFile:
    """A file of a test image, with the mode and owner that the image's tar records."""

    path: str
    content: bytes
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class RunResult:
    """Exit code and combined output of a finished test container."""

    exit_code: int
    output: str

    def results(self) -> dict[str, str]:
        """Parse "<name> <result>" lines, as the test programs print them."""
        parsed = {}
        for line in self.output.splitlines():
            name, _, result = line.partition(" ")
            if result and not name.startswith("#"):
                parsed[name] = result
        return parsed


def compile_static(source: str, output: Path) -> Path:
    """Compile a C program from tests/support/programs into a static binary at output.

    Raises FileNotFoundError without gcc and subprocess.CalledProcessError when it fails.
    """
    if shutil.which("gcc") is None:
        raise FileNotFoundError("gcc not found; install it with: apt-get install gcc libc6-dev")
    subprocess.run(
        ["gcc", "-static", "-O1", "-Wall", "-Werror", "-o", str(output), str(PROGRAMS / source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return output


def import_image(client: docker.DockerClient, files: list[ImageFile]) -> str:
    """Import busybox, its applet links and files as an image; return the image ID.

    The image sets no user, so a container runs as root unless created with another user,
    which create_arguments always sets.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for directory in ("bin", "dev", "etc", "proc", "sys", "tmp", "usr", "usr/local"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if directory == "tmp" else 0o755
            archive.addfile(info)
        _add(archive, ImageFile(path="bin/busybox", content=BUSYBOX.read_bytes()))
        for applet in ("sh", "cat", "id", "ls", "stat", "dd", "grep", "mount", "touch", "echo"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            archive.addfile(link)
        for file in files:
            _add(archive, file)
    response = client.api.import_image_from_data(
        buffer.getvalue(), changes=["ENV PATH=/bin:/usr/local/bin", "WORKDIR /"]
    )
    for line in response.splitlines():
        status = json.loads(line).get("status", "") if line.strip() else ""
        if status.startswith("sha256:"):
            return str(status)
    raise RuntimeError(f"docker import returned no image ID: {response!r}")


def hardened_arguments(
    image_id: str, *, name: str, flags: list[str] | None = None
) -> dict[str, Any]:
    """Return create_arguments for image_id as an agent would get them, minus the network."""
    settings = load_settings(SupervisorSettings, [*runtime_args(), *(flags or [])])
    agent = AgentContainer(
        agent_id=name, host_id="test", image_id=image_id, image_digest="sha256:" + "0" * 64
    )
    arguments = create_arguments(
        agent,
        settings=settings,
        seccomp_profile=load_seccomp_profile(settings.seccomp_profile),
    )
    for option in ("network", "ports", "dns"):
        arguments.pop(option)
    arguments["network_mode"] = "none"
    # Under runsc the agent gets a resolv.conf naming the sandbox gateway, which this
    # container without a network does not need.
    arguments["mounts"] = [
        mount for mount in arguments["mounts"] if mount.get("Target") != RESOLV_CONF
    ]
    arguments["name"] = f"agent-runner-test-{name}-{os.getpid()}"
    arguments["labels"] = {**arguments["labels"], LABEL_TEST: "true"}
    return arguments


def run_to_completion(
    client: docker.DockerClient, arguments: dict[str, Any], command: list[str]
) -> RunResult:
    """Create, start and wait for a container; remove it whatever happens."""
    with _created(client, {**arguments, "command": command}) as container:
        container.start()
        status = container.wait(timeout=RUN_TIMEOUT)
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
    return RunResult(exit_code=int(status["StatusCode"]), output=output)


def remove_image(client: docker.DockerClient, image_id: str) -> None:
    """Remove a test image; a missing one is fine."""
    with contextlib.suppress(NotFound):
        client.images.remove(image_id, force=True)


@contextlib.contextmanager
def _created(client: docker.DockerClient, arguments: dict[str, Any]) -> Iterator[Any]:
    container = client.containers.create(**arguments)
    try:
        yield container
    finally:
        container.remove(force=True, v=True)


def _add(archive: tarfile.TarFile, file: ImageFile) -> None:
    info = tarfile.TarInfo(file.path)
    info.size = len(file.content)
    info.mode = file.mode
    info.uid = file.uid
    info.gid = file.gid
    archive.addfile(info, io.BytesIO(file.content))
