"""The agent's file system: a read-only root, and /tmp and /dev/shm as bounded tmpfs mounts.

The containers are created with the supervisor's arguments and small limits, and a busybox
shell script looks at them from the inside as the agent's user.
"""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.support.hardened import (
    ImageFile,
    compile_static,
    hardened_arguments,
    import_image,
    remove_image,
    run_to_completion,
)
from tests.support.stack import agent_runtime

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
DISK_LIMIT = 2 * MIB
SHM_LIMIT = 1 * MIB
LIMIT_FLAGS = [f"--container-disk-limit={DISK_LIMIT}", f"--container-shm-limit={SHM_LIMIT}"]
WRITABLE_PATHS = {"/tmp", "/dev/shm"}

# Prints "writable <mount point> <options>" for each mount point where the agent can create
# a file.
FIND_WRITABLE = """
while read -r device mount_point type options rest; do
    if touch "$mount_point/.write-probe" 2>/dev/null; then
        echo "writable $mount_point $options"
        rm -f "$mount_point/.write-probe"
    fi
done < /proc/self/mounts
"""

FILL = """
for directory in /tmp /dev/shm; do
    dd if=/dev/zero of="$directory/fill" bs=65536 count=1000 2>/dev/null
    echo "filled $directory $(stat -c %s "$directory/fill")"
done
"""

EXECUTE = """
for directory in /tmp /dev/shm; do
    cp /usr/local/bin/sysprobe "$directory/sysprobe" && chmod 755 "$directory/sysprobe"
    "$directory/sysprobe" getpid 2>/dev/null
    echo "exec $directory $?"
done
"""


@pytest.fixture(scope="module")
def image(
    docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = compile_static("sysprobe.c", tmp_path_factory.mktemp("fs") / "sysprobe")
    image_id = import_image(
        docker_client,
        [
            ImageFile(path="usr/local/bin/sysprobe", content=binary.read_bytes()),
        ],
    )
    yield image_id
    remove_image(docker_client, image_id)


def run_script(client: docker.DockerClient, image_id: str, script: str) -> list[str]:
    arguments = hardened_arguments(image_id, name="filesystem", flags=LIMIT_FLAGS)
    result = run_to_completion(client, arguments, ["sh", "-c", script])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_only_tmpfs_mounts_writable(docker_client: docker.DockerClient, image: str) -> None:
    lines = run_script(docker_client, image, FIND_WRITABLE)

    writable = {line.split()[1]: line.split()[2].split(",") for line in lines}
    assert writable.keys() == WRITABLE_PATHS, lines
    # runsc 0.0~20221219 lists only noexec of the three in /proc/self/mounts.
    required = ("nosuid", "nodev", "noexec") if agent_runtime() == "runc" else ("noexec",)
    for path, options in writable.items():
        for option in required:
            assert option in options, f"{path} is mounted without {option}: {options}"


def test_tmpfs_sizes_and_modes(docker_client: docker.DockerClient, image: str) -> None:
    lines = run_script(
        docker_client, image, "stat -c '%n %a %u' /tmp /dev/shm; df -k /tmp /dev/shm"
    )

    assert lines[:2] == ["/tmp 1777 0", "/dev/shm 1777 0"]
    sizes = {line.split()[-1]: int(line.split()[1]) for line in lines[3:]}
    assert sizes == {"/tmp": DISK_LIMIT // 1024, "/dev/shm": SHM_LIMIT // 1024}


def test_fill_stops_at_limit(docker_client: docker.DockerClient, image: str) -> None:
    lines = run_script(docker_client, image, FILL)

    assert lines == [f"filled /tmp {DISK_LIMIT}", f"filled /dev/shm {SHM_LIMIT}"]


def test_no_exec_from_writable_paths(docker_client: docker.DockerClient, image: str) -> None:
    lines = run_script(docker_client, image, EXECUTE)

    # 126: the shell found the file but the kernel refused to execute it.
    assert lines == ["exec /tmp 126", "exec /dev/shm 126"]


@pytest.mark.parametrize("path", ["/probe", "/etc/probe", "/bin/probe", "/usr/local/probe"])
def test_root_filesystem_read_only(
    docker_client: docker.DockerClient, image: str, path: str
) -> None:
    lines = run_script(docker_client, image, f"touch {path} 2>&1; echo status $?")

    assert lines[-1] == "status 1"
    if agent_runtime() == "runc":
        assert "Read-only file system" in lines[0]
    else:
        # runsc checks permissions before the read-only flag.
        assert "Read-only file system" in lines[0] or "Permission denied" in lines[0]


def test_no_posix_message_queues(docker_client: docker.DockerClient, image: str) -> None:
    # RLIMIT_MSGQUEUE is 0: under runc every agent runs as the same user, whose queues share
    # one limit in the host's kernel. gVisor ignores the limit, but its queues live in the
    # sandbox's own kernel and memory, so no agent reaches another's or the host's.
    lines = run_script(docker_client, image, "sysprobe mq_open")

    assert lines == ["mq_open EMFILE" if agent_runtime() == "runc" else "mq_open ok"]
