"""Image helpers for the integration tests, which have no registry to pull from.

Test images are imported from a root filesystem made of Debian's busybox-static (/bin/busybox
plus one symlink per applet) and any extra files. The echo agent's files are read from
examples/echo-agent/files, so the tests run the same agent that examples/echo-agent/build.sh
packages.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path, PurePosixPath

import docker
from docker.errors import APIError
from docker.utils import parse_repository_tag

BUSYBOX = Path("/bin/busybox")
REPO_ROOT = Path(__file__).resolve().parents[2]
ECHO_AGENT_FILES = REPO_ROOT / "examples" / "echo-agent" / "files"
ECHO_AGENT_ENTRYPOINT = ["/entrypoint.sh"]
# Programs, the dynamic loader and shared libraries start with it. The first two need mode 755
# to be executed, and libraries get the same mode.
ELF_MAGIC = b"\x7fELF"

# Empty mount points, so that Docker need not create them in a read-only root filesystem.
_BASE_DIRECTORIES = ("bin", "dev", "etc", "proc", "sys")


def build_busybox_image(
    client: docker.DockerClient,
    *,
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    workdir: str = "/",
    extra_files: dict[str, bytes] | None = None,
    tag: str | None = None,
) -> str:
    """Import a busybox image and return its ID, "sha256:<64 hex digits>".

    extra_files maps paths relative to the image root to file contents. A file starting with
    "#!" or with the ELF magic number gets mode 755, any other file 644, and every file is
    owned by root. An extra file may replace an applet link such as "bin/sh". The image sets
    PATH=/bin and no user, so it runs as root unless the container is started with another
    user. It is tagged only when tag ("name" or "name:tag") is given.

    Raises FileNotFoundError when /bin/busybox is missing or not statically linked. Raises
    ValueError for an extra-file path that is absolute, contains "..", names bin/busybox or
    names a directory of the image. Raises docker.errors.APIError when the daemon rejects the
    import.
    """
    if not workdir.startswith("/"):
        raise ValueError(f"workdir must be an absolute path, got {workdir!r}")
    changes = [f"WORKDIR {workdir}", "ENV PATH=/bin"]
    if entrypoint is not None:
        changes.append(f"ENTRYPOINT {json.dumps(entrypoint)}")
    if cmd is not None:
        changes.append(f"CMD {json.dumps(cmd)}")

    layer = _busybox_rootfs_tar(extra_files or {})

    repository, image_tag = parse_repository_tag(tag) if tag is not None else (None, None)
    response = client.api.import_image_from_data(
        layer, repository=repository, tag=image_tag, changes=changes
    )
    return _image_id_from_import_response(response)


def build_echo_agent_image(client: docker.DockerClient, *, tag: str | None = None) -> str:
    """Import the echo agent as an image and return its ID.

    Unlike the image from examples/echo-agent/build.sh, this one sets no user, so tests can
    check that the runner forces one.
    """
    return build_busybox_image(
        client,
        entrypoint=list(ECHO_AGENT_ENTRYPOINT),
        cmd=None,
        extra_files=echo_agent_files(),
        tag=tag,
    )


def echo_agent_files() -> dict[str, bytes]:
    """Read the echo agent's files, keyed by their path relative to the image root."""
    return {
        path.relative_to(ECHO_AGENT_FILES).as_posix(): path.read_bytes()
        for path in sorted(ECHO_AGENT_FILES.rglob("*"))
        if path.is_file()
    }


def save_image_tarball(client: docker.DockerClient, image_ref: str, path: Path) -> str:
    """Write `docker save image_ref` to path and return the file's digest, "sha256:<hex>".

    Saving by image ID gives a tarball without repository tags, and saving by name records
    that name in the tarball's manifest.json.
    """
    digest = hashlib.sha256()
    with path.open("wb") as tarball:
        for chunk in client.api.get_image(image_ref):
            tarball.write(chunk)
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _busybox_rootfs_tar(extra_files: dict[str, bytes]) -> bytes:
    _require_static_busybox()
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    files = {_relative_image_path(raw).as_posix(): content for raw, content in extra_files.items()}
    directories = _directories_for(files)

    # docker import rejects a tar that names a path twice, so an extra file replaces an applet
    # link by leaving the link out, and every other clash is an error.
    clashes = sorted(directories.intersection(files))
    if clashes:
        raise ValueError(f"extra file paths clash with directories of the image: {clashes!r}")
    if "bin/busybox" in files:
        raise ValueError("extra file path 'bin/busybox' would replace the busybox binary")

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        # Sorting puts each directory before its subdirectories.
        for name in sorted(directories):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            archive.addfile(info)

        _add_file(archive, "bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
        for applet in applets:
            # busybox --list names busybox itself too, and a link would replace the binary.
            if applet != "busybox" and f"bin/{applet}" not in files:
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type = tarfile.SYMTYPE
                link.linkname = "busybox"
                archive.addfile(link)

        for name, content in sorted(files.items()):
            mode = 0o755 if content.startswith((b"#!", ELF_MAGIC)) else 0o644
            _add_file(archive, name, content, mode=mode)
    return buffer.getvalue()


def _directories_for(files: dict[str, bytes]) -> set[str]:
    directories = set(_BASE_DIRECTORIES)
    for name in files:
        directories.update(parent.as_posix() for parent in PurePosixPath(name).parents[:-1])
    return directories


def _require_static_busybox() -> None:
    if not BUSYBOX.is_file():
        raise FileNotFoundError(
            f"{BUSYBOX} not found; install it with: apt-get install busybox-static"
        )
    # ldd fails on a static binary. A dynamically linked busybox cannot run in an image that
    # has no C library.
    ldd_result = subprocess.run(["ldd", str(BUSYBOX)], capture_output=True, check=False, timeout=30)
    if ldd_result.returncode == 0:
        raise FileNotFoundError(
            f"{BUSYBOX} is dynamically linked; install the static build with: "
            "apt-get install busybox-static"
        )


def _relative_image_path(raw_path: str) -> PurePosixPath:
    path = PurePosixPath(raw_path)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(
            f"extra file path must be relative to the image root without '..', got {raw_path!r}"
        )
    return path


def _add_file(archive: tarfile.TarFile, name: str, content: bytes, *, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = mode
    archive.addfile(info, io.BytesIO(content))


def _image_id_from_import_response(response: str) -> str:
    # The daemon responds to an import with JSON lines and puts the new image ID in "status".
    for line in response.splitlines():
        if not line.strip():
            continue
        message = json.loads(line)
        if "error" in message:
            raise APIError(f"docker import failed: {message['error']}")
        status = message.get("status", "")
        if status.startswith("sha256:"):
            return str(status)
    raise APIError(f"docker import returned no image ID: {response!r}")
