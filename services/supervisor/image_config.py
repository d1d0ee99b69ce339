"""Checks on an image's run settings, made before `docker load`.

The supervisor calls `check_image_config` on the config that `inspect_image_tarball` parsed,
after the download, digest and tarball structure checks and before `docker load`. Docker
applies these settings to every container it creates from the image, so an image must not
set a working directory inside kernel file systems, declare volumes, or lack a command.

Docker decodes the config with Go's encoding/json, which matches object keys to struct
fields case-insensitively. So "workingdir" sets WorkingDir, and of two keys that differ only
in case the later one wins. Fields are therefore looked up by case-folded key, and keys that
fold to the same name are rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.supervisor.errors import FailureReason, ImageRejected

# A working directory in these kernel file systems can reach host resources. For example,
# runc before 1.1.12 leaked a file descriptor of a host directory into the container, which
# a working directory of /proc/self/fd/<n> opened (CVE-2024-21626).
_FORBIDDEN_WORKDIR_ROOTS = frozenset({"proc", "sys", "dev"})


def check_image_config(config: Mapping[str, Any]) -> None:
    """Raise ImageRejected unless the image config is safe to run.

    `config` is the parsed image config JSON. Its "config" object must set an absolute
    WorkingDir outside /proc, /sys and /dev (or none), declare no Volumes, and set an
    Entrypoint or Cmd. The error's reason is WORKDIR_RELATIVE, WORKDIR_FORBIDDEN,
    VOLUMES_DECLARED, NO_COMMAND, or CONFIG_INVALID for fields of the wrong type.
    """
    run_config = _fold_keys(config, "image config").get("config")
    if not isinstance(run_config, Mapping):
        raise ImageRejected(
            FailureReason.CONFIG_INVALID,
            f"image config field 'config' is {run_config!r:.80}, expected an object",
        )
    fields = _fold_keys(run_config, "image config field 'config'")

    _check_working_dir(fields.get("workingdir"))
    _check_volumes(fields.get("volumes"))
    _check_command(fields.get("entrypoint"), fields.get("cmd"))


def _fold_keys(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Return `obj` keyed by case-folded key, rejecting keys that fold to the same name.

    str.casefold also folds the Kelvin sign and long s, which Go's matching folds too.
    """
    folded: dict[str, Any] = {}
    originals: dict[str, str] = {}
    for key, value in obj.items():
        fold = key.casefold()
        if fold in originals:
            raise ImageRejected(
                FailureReason.CONFIG_INVALID,
                f"{where} has keys {originals[fold]!r} and {key!r}, which Docker reads as the "
                "same field, expected only one",
            )
        originals[fold] = key
        folded[fold] = value
    return folded


def _check_working_dir(value: Any) -> None:
    if value is None or value == "":
        return
    if not isinstance(value, str):
        raise ImageRejected(
            FailureReason.CONFIG_INVALID,
            f"WorkingDir is {value!r:.80}, expected a string",
        )
    if not value.startswith("/"):
        raise ImageRejected(
            FailureReason.WORKDIR_RELATIVE,
            f"WorkingDir {value!r} is relative, expected an absolute path",
        )

    parts: list[str] = []
    for part in value.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    # FIXME: a layer can make an allowed path such as /work a symlink into /proc, which this
    # check cannot see without reading the layers. Only a patched runc closes that route.
    if parts and parts[0] in _FORBIDDEN_WORKDIR_ROOTS:
        raise ImageRejected(
            FailureReason.WORKDIR_FORBIDDEN,
            f"WorkingDir {value!r} is under /{parts[0]}, expected a path outside "
            "/proc, /sys and /dev",
        )


def _check_volumes(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ImageRejected(
            FailureReason.CONFIG_INVALID,
            f"Volumes is {value!r:.80}, expected an object",
        )
    if value:
        # Docker would create a writable anonymous volume on the host disk for each entry,
        # outside the read-only root file system and its size limit.
        raise ImageRejected(
            FailureReason.VOLUMES_DECLARED,
            f"image declares volumes {sorted(value)!r}, expected none; remove VOLUME from "
            "the Dockerfile",
        )


def _check_command(entrypoint: Any, cmd: Any) -> None:
    if not _command_args(entrypoint, "Entrypoint") and not _command_args(cmd, "Cmd"):
        raise ImageRejected(
            FailureReason.NO_COMMAND,
            f"image has Entrypoint {entrypoint!r} and Cmd {cmd!r}, expected at least one "
            "to name a command",
        )


def _command_args(value: Any, field: str) -> list[str]:
    """Return the arguments of Entrypoint or Cmd, which Docker accepts as a list or string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(arg, str) for arg in value):
        return value
    raise ImageRejected(
        FailureReason.CONFIG_INVALID,
        f"{field} is {value!r:.80}, expected a list of strings",
    )
