#!/usr/bin/python3 -IS
"""OCI runtime wrapper that lets Debian's runsc (gVisor) start containers on kernels >= 6.10.

Docker calls this program as it would call runsc. Debian's runsc (every build up to
0.0~20221219) decides that it runs in the host's network namespace when
/proc/sys/net/core/rmem_default exists, and kernels from about 6.10 show that file in every
network namespace, so it rejects every container with "cannot run with network enabled in
root network namespace". `create` runs that check, and so does
`start`, which sets up the sandbox's network. The wrapper therefore runs runsc in a private
mount namespace where an empty read-only tmpfs covers /proc/sys/net, for every subcommand.
It adds --platform=ptrace and --oci-seccomp (see RUNSC_FLAGS); other arguments pass through.

Covering /proc/sys/net also disables runsc's own guard against a container in the host's
network namespace. Such a container would let the sandbox take over the host's interfaces, so
the wrapper rejects it itself before `create`, `run` and `restore`: the bundle's config.json
must list a network namespace, and that namespace must not be the one of PID 1 or of this
process. Docker's `--network=host` lists /var/run/docker/netns/default, the host's.

Writable bind mounts, such as the tmpfs volumes that agent-runner gives agents at /tmp and
/dev/shm under gVisor, get nosuid, nodev and noexec in the bundle's config.json before
`create`. Docker has no way to ask for these on a volume, and gVisor applies the flags it is
given itself: without them it neither lists nor enforces flags of the host's mount, and
running a program from such a mount ends in SIGSEGV instead of EACCES.

A failed `create` or `start` leaves runsc sandbox and gofer processes behind that `docker rm`
does not remove. After such a failure the wrapper runs `runsc delete --force` for the
container and then sends SIGKILL to each remaining runsc process with the container id in an
argument, by pid.

Install it with scripts/deps.sh, which copies it to /usr/local/lib/agent-runner/ and
registers it with Docker as the runtime `runsc`. It uses only the standard library and runs
with `-I -S`, because Docker starts it several times per container.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

RUNSC = "/usr/bin/runsc"
# Debian's runsc 0.0~20221219 supports the ptrace and kvm platforms; systrap came later. KVM
# needs /dev/kvm, which virtual machines often lack, so ptrace is the one that runs anywhere.
# A "--platform=kvm" in the runtime's runtimeArgs in daemon.json comes later and wins.
PLATFORM = "ptrace"
# --oci-seccomp applies the container's seccomp profile inside the sandbox too; without it
# runsc 0.0~20221219 ignores the profile that Docker passes.
RUNSC_FLAGS = (f"--platform={PLATFORM}", "--oci-seccomp")
PROC_SYS_NET = "/proc/sys/net"
HOST_NETNS_PATHS = ("/proc/1/ns/net", "/proc/self/ns/net")
# runsc subcommands that start a sandbox, and so need the private mount namespace and the check.
SANDBOX_SUBCOMMANDS = frozenset({"create", "run", "restore"})
SUBCOMMANDS = SANDBOX_SUBCOMMANDS | frozenset(
    {
        "boot",
        "checkpoint",
        "debug",
        "delete",
        "do",
        "events",
        "exec",
        "flags",
        "gofer",
        "help",
        "kill",
        "list",
        "pause",
        "ps",
        "resume",
        "spec",
        "start",
        "state",
        "wait",
    }
)
# Flags of create, run and restore that take no value; the others take one.
BOOLEAN_FLAGS = frozenset({"detach", "no-subreaper"})
EXIT_REJECTED = 125

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000


class Rejected(Exception):
    """A container that this wrapper must not start; the message gives the reason and the fix."""


def find_subcommand(args: list[str]) -> int | None:
    """Return the index of the runsc subcommand in `args`, or None when there is none.

    Global flags come first, some with a separate value (`--root DIR`), and no flag value that
    Docker passes is a subcommand name, so the first argument that is one is the subcommand.
    """
    for index, arg in enumerate(args):
        if arg in SUBCOMMANDS:
            return index
    return None


def parse_bundle(args: list[str]) -> tuple[Path, str]:
    """Return the bundle folder and the container id of a create, run or restore command.

    `args` starts after the subcommand. The bundle defaults to the current folder, as in runsc.
    """
    bundle = Path.cwd()
    positional: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        name, has_value, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-"):
            positional.append(arg)
        elif name == "bundle":
            if not has_value:
                index += 1
                value = args[index] if index < len(args) else ""
            bundle = Path(value)
        elif not has_value and name not in BOOLEAN_FLAGS:
            index += 1
        index += 1
    if not positional:
        raise Rejected("no container id given")
    return bundle, positional[-1]


def check_network_namespace(config: object) -> None:
    """Raise Rejected unless the OCI config puts the container in its own network namespace."""
    linux = config.get("linux") if isinstance(config, dict) else None
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    if not isinstance(namespaces, list):
        raise Rejected("config.json lists no namespaces, so the container would share the host's")
    network = [ns for ns in namespaces if isinstance(ns, dict) and ns.get("type") == "network"]
    if not network:
        raise Rejected(
            "the container has no network namespace of its own (such as docker run "
            "--network=host); run it with a bridge network or --network=none"
        )
    for namespace in network:
        path = namespace.get("path")
        if not path:
            continue
        if not isinstance(path, str):
            raise Rejected(f"network namespace path {path!r} is not a string")
        try:
            target = os.stat(path)
        except OSError as exc:
            raise Rejected(f"cannot inspect network namespace {path!r}: {exc.strerror}") from exc
        for host_path in HOST_NETNS_PATHS:
            try:
                host = os.stat(host_path)
            except PermissionError:
                # Some hosts deny even root a look at PID 1's namespaces (Yama, a VM agent
                # as PID 1). Docker's shim runs in the host's network namespace, so the
                # comparison with /proc/self/ns/net still catches --network=host.
                if host_path == "/proc/self/ns/net":
                    raise Rejected("cannot inspect this process's network namespace") from None
                continue
            if (target.st_dev, target.st_ino) == (host.st_dev, host.st_ino):
                raise Rejected(
                    f"network namespace {path!r} is the host's ({host_path}); run the "
                    "container with a bridge network or --network=none"
                )


WRITABLE_MOUNT_FLAGS = ("nosuid", "nodev", "noexec")


def harden_mounts(config: object) -> bool:
    """Add nosuid, nodev and noexec to every writable bind mount; return True on any change."""
    mounts = config.get("mounts") if isinstance(config, dict) else None
    if not isinstance(mounts, list):
        return False
    changed = False
    for mount in mounts:
        if not isinstance(mount, dict):
            continue
        options = mount.get("options")
        if not isinstance(options, list) or not {"bind", "rbind"} & set(options):
            continue
        if "ro" in options:
            continue
        missing = [flag for flag in WRITABLE_MOUNT_FLAGS if flag not in options]
        if missing:
            mount["options"] = [*options, *missing]
            changed = True
    return changed


def save_config(bundle: Path, config: object) -> None:
    """Replace the bundle's config.json atomically; raise Rejected when it cannot be written."""
    path = bundle / "config.json"
    temporary = bundle / f".config.json.{os.getpid()}"
    try:
        temporary.write_text(json.dumps(config))
        os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise Rejected(f"cannot write {str(path)!r}: {exc}") from exc


def report_error(global_args: list[str], message: str) -> None:
    """Write `message` to stderr and, as runc does, to the --log file that Docker reads."""
    print(f"runsc-agent-runner: {message}", file=sys.stderr)
    log_file = None
    for index, arg in enumerate(global_args):
        name, has_value, value = arg.lstrip("-").partition("=")
        if name == "log":
            log_file = value if has_value else next(iter(global_args[index + 1 :]), None)
    if not log_file:
        return
    # containerd's shim shows the last "error" entry of this file in its error message.
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    entry = {"level": "error", "msg": f"runsc-agent-runner: {message}", "time": now}
    with contextlib.suppress(OSError), open(log_file, "a") as file:
        file.write(json.dumps(entry) + "\n")


def load_config(bundle: Path) -> object:
    """Read the bundle's config.json; raise Rejected when it cannot be read as JSON."""
    try:
        return json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise Rejected(f"cannot read {str(bundle / 'config.json')!r}: {exc}") from exc


def cover_proc_sys_net() -> None:
    """Enter a private mount namespace and mount an empty read-only tmpfs on /proc/sys/net."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    # Without private propagation the tmpfs would appear in the host's mount namespace too.
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making / a private mount failed")
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"none", PROC_SYS_NET.encode(), b"tmpfs", flags, b"size=4k,mode=555") != 0:
        raise OSError(ctypes.get_errno(), f"mounting a tmpfs on {PROC_SYS_NET} failed")


def leftover_pids(container_id: str) -> list[int]:
    """Return the pids of runsc processes with `container_id` in an argument."""
    runsc = os.path.realpath(RUNSC)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            executable = os.readlink(f"/proc/{entry}/exe").removesuffix(" (deleted)")
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                arguments = file.read().split(b"\0")
        except OSError:
            continue  # the process ended or is not ours to read
        # The sandbox has the id as an argument, the gofer only inside its bundle path.
        if executable == runsc and any(container_id.encode() in arg for arg in arguments):
            pids.append(int(entry))
    return pids


def clean_up(global_args: list[str], container_id: str) -> None:
    """Remove what a failed start left: runsc's state, then the container's runsc processes."""
    subprocess.run(
        [RUNSC, *global_args, "delete", "--force", container_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    for pid in leftover_pids(container_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        print(f"runsc-agent-runner: killed leftover runsc process {pid}", file=sys.stderr)


def main(argv: list[str]) -> int:
    """Check and run one runtime command; return its exit status."""
    index = find_subcommand(argv)
    subcommand = argv[index] if index is not None else None
    global_args = [*RUNSC_FLAGS, *argv[:index]]
    container_id = None
    try:
        if index is not None and subcommand in SANDBOX_SUBCOMMANDS:
            bundle, container_id = parse_bundle(argv[index + 1 :])
            config = load_config(bundle)
            check_network_namespace(config)
            if harden_mounts(config):
                save_config(bundle, config)
        elif index is not None and subcommand == "start":
            container_id = parse_bundle(argv[index + 1 :])[1]
    except Rejected as exc:
        report_error(global_args, f"rejected {subcommand}: {exc}")
        return EXIT_REJECTED

    # `start` sets up the sandbox's network, which runs the same check as `create`.
    cover_proc_sys_net()
    if index is None or container_id is None:
        os.execv(RUNSC, [RUNSC, *RUNSC_FLAGS, *argv])  # noqa: S606 - runsc with the same argv

    status = subprocess.run([RUNSC, *global_args, *argv[index:]], check=False).returncode
    if status != 0:
        clean_up(global_args, container_id)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
