"""The gVisor wrapper runtime's argument parsing and network-namespace check.

The wrapper is run as a program by Docker, so it is loaded here from its file. Rejections are
also checked by running the program itself: it must exit before it starts runsc.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

WRAPPER = Path(__file__).resolve().parents[3] / "runtime" / "runsc_agent_runner.py"


def load_wrapper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runsc_agent_runner", WRAPPER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wrapper = load_wrapper()

DOCKER_GLOBAL_ARGS = [
    "--root",
    "/var/run/docker/runtime-runc/moby",
    "--log",
    "/run/x/log.json",
    "--log-format",
    "json",
]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param([*DOCKER_GLOBAL_ARGS, "create", "--bundle", "/b", "id"], 6, id="create"),
        pytest.param(["--root=/r", "start", "id"], 1, id="start"),
        pytest.param(["--systemd-cgroup", "delete", "--force", "id"], 1, id="delete"),
        pytest.param(["--version"], None, id="no-subcommand"),
    ],
)
def test_find_subcommand(args: list[str], expected: int | None) -> None:
    assert wrapper.find_subcommand(args) == expected


@pytest.mark.parametrize(
    ("args", "bundle", "container_id"),
    [
        pytest.param(["--bundle", "/b", "--pid-file", "/p", "cid"], "/b", "cid", id="separate"),
        pytest.param(["--bundle=/b", "cid"], "/b", "cid", id="equals"),
        pytest.param(["-bundle", "/b", "--detach", "cid"], "/b", "cid", id="boolean-flag"),
        pytest.param(["--console-socket", "/s", "cid"], str(Path.cwd()), "cid", id="cwd"),
    ],
)
def test_parse_bundle(args: list[str], bundle: str, container_id: str) -> None:
    assert wrapper.parse_bundle(args) == (Path(bundle), container_id)


def test_parse_bundle_without_id() -> None:
    with pytest.raises(wrapper.Rejected, match="no container id"):
        wrapper.parse_bundle(["--bundle", "/b"])


def namespaces(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"linux": {"namespaces": [{"type": "pid"}, *entries]}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param({}, "lists no namespaces", id="no-linux"),
        pytest.param({"linux": {"namespaces": None}}, "lists no namespaces", id="null"),
        pytest.param(namespaces(), "no network namespace of its own", id="host-network"),
        pytest.param(
            namespaces({"type": "network", "path": "/proc/self/ns/net"}),
            "is the host's",
            id="own-namespace",
        ),
        pytest.param(
            namespaces({"type": "network", "path": "/proc/thread-self/ns/net"}),
            "is the host's",
            id="same-inode-other-path",
        ),
        pytest.param(
            namespaces({"type": "network", "path": "/nonexistent/ns"}),
            "cannot inspect network namespace",
            id="missing-path",
        ),
        pytest.param(
            namespaces({"type": "network", "path": 7}), "is not a string", id="path-not-string"
        ),
    ],
)
def test_network_namespace_rejected(config: dict[str, Any], message: str) -> None:
    with pytest.raises(wrapper.Rejected, match=message):
        wrapper.check_network_namespace(config)


def test_network_namespace_of_its_own_accepted(tmp_path: Path) -> None:
    # A namespace created for the container, here stood in for by a file of another inode.
    other = tmp_path / "netns"
    other.touch()
    wrapper.check_network_namespace(namespaces({"type": "network", "path": str(other)}))
    wrapper.check_network_namespace(namespaces({"type": "network"}))


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        pytest.param(json.dumps(namespaces()), "no network namespace of its own", id="host"),
        pytest.param("{not json", "cannot read", id="invalid-json"),
        pytest.param(None, "cannot read", id="missing-config"),
    ],
)
def test_wrapper_program_rejects_before_runsc(
    tmp_path: Path, config_text: str | None, message: str
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    if config_text is not None:
        (bundle / "config.json").write_text(config_text)
    log_file = tmp_path / "log.json"
    state_root = tmp_path / "root"

    completed = subprocess.run(
        [
            sys.executable,
            str(WRAPPER),
            "--root",
            str(state_root),
            "--log",
            str(log_file),
            "--log-format",
            "json",
            "create",
            "--bundle",
            str(bundle),
            "container-1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert completed.returncode == wrapper.EXIT_REJECTED
    assert "runsc-agent-runner: rejected create:" in completed.stderr
    assert message in completed.stderr
    entry = json.loads(log_file.read_text().splitlines()[-1])
    assert entry["level"] == "error"
    assert message in entry["msg"]
    # runsc never ran, so it created no state folder.
    assert not state_root.exists()


# The mounts Docker 20.10 writes for an agent under runsc: a read-only bind, a file Docker
# binds read-write, a tmpfs volume, and Docker's own flags on /dev/mqueue.
DOCKER_MOUNTS = [
    ("/etc/resolv.conf", "bind", ["rbind", "rprivate", "ro"]),
    ("/etc/hosts", "bind", ["rbind", "rprivate"]),
    ("/tmp", "bind", ["rbind", "rprivate"]),
    ("/dev/mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
    ("/dev/shm", "bind", ["rbind", "nosuid"]),
]


def test_writable_binds_get_nosuid_nodev_noexec() -> None:
    config = {
        "mounts": [
            {"destination": target, "type": kind, "source": "/s", "options": list(options)}
            for target, kind, options in DOCKER_MOUNTS
        ]
    }

    assert wrapper.harden_mounts(config) is True

    options = {mount["destination"]: mount["options"] for mount in config["mounts"]}
    assert options == {
        "/etc/resolv.conf": ["rbind", "rprivate", "ro"],
        "/etc/hosts": ["rbind", "rprivate", "nosuid", "nodev", "noexec"],
        "/tmp": ["rbind", "rprivate", "nosuid", "nodev", "noexec"],
        "/dev/mqueue": ["nosuid", "noexec", "nodev"],
        "/dev/shm": ["rbind", "nosuid", "nodev", "noexec"],
    }
    assert wrapper.harden_mounts(config) is False


@pytest.mark.parametrize("config", [{}, {"mounts": None}, {"mounts": [None, {"options": 3}]}, []])
def test_odd_mount_lists_left_alone(config: Any) -> None:
    assert wrapper.harden_mounts(config) is False


def test_saved_config_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{}")
    path.chmod(0o600)

    wrapper.save_config(tmp_path, {"mounts": []})

    assert json.loads(path.read_text()) == {"mounts": []}
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["config.json"]
