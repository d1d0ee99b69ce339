"""Member-level checks on an image tarball: header format, names, types and limits.

`tarball.inspect_image_tarball` calls these after the download and digest check and before
`docker load`, then checks the image layout on the members returned here. Nothing is
extracted. The daemon reads the same archive with Go's archive/tar and encoding/json. So
whatever Python's tarfile and json might read differently is rejected: GNU, v7 and star
headers, PAX global headers, chained extension headers, size fields and PAX records that the
two parse differently, data after the end of the archive and duplicate JSON keys.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import IO, Any

from services.supervisor.errors import FailureReason, ImageRejected

_COMPRESSION_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}
_BLOCK = tarfile.BLOCKSIZE
_USTAR_MAGIC = b"ustar\x0000"
_STAR_TRAILER = b"tar\x00"
# Go's archive/tar (1.19, parseOctal) trims spaces and NULs from both ends of a size field
# before parsing it, while Python's tarfile stops at the first NUL. So a field such as
# b"\x0000000001750" is 1000 bytes for the daemon and 0 for Python, and the two then read
# different members. Octal digits after optional spaces, padded at the end with spaces or
# NULs, read the same in both.
_SIZE_FIELD = re.compile(rb" *[0-7]*[ \x00]*")
# PAX records that both readers apply the same way. Python's tarfile 3.11 also renames a
# member to any GNU.sparse.name and decodes names by hdrcharset, where Go applies
# GNU.sparse.name to sparse files only and ignores hdrcharset.
_PAX_KEYS = frozenset(
    {
        "path",
        "linkpath",
        "size",
        "uid",
        "gid",
        "uname",
        "gname",
        "mtime",
        "atime",
        "ctime",
        "comment",
    }
)
_PAX_XATTR_PREFIX = "SCHILY.xattr."
_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\]")
_SPECIAL_TYPES = {
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


class _DuplicateKeyError(ValueError):
    pass


def reject_compressed(path: Path) -> None:
    """Raise ImageRejected (NOT_A_TAR) if the file starts with a compression magic number.

    `docker save` writes plain tar, and rejecting compression also rules out compression
    bombs.
    """
    with path.open("rb") as file:
        kind = _compression_of(file.read(8))
    if kind is not None:
        raise ImageRejected(
            FailureReason.NOT_A_TAR,
            f"file is {kind}-compressed, expected the plain tar that `docker save` writes",
        )


def check_layer_start(archive: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
    """Raise ImageRejected (NOT_A_TAR) unless the layer member starts like a plain tar.

    `docker load` decompresses a gzip, bzip2, xz or zstd layer without a size limit, so a
    small compressed layer can fill the daemon's disk, and `docker save` writes plain tar
    layers only. The first block must be a tar header with a valid checksum or, for an
    empty layer, all zero. The rest of the layer is not read.
    """
    reader = archive.extractfile(member)
    if reader is None:
        raise ImageRejected(FailureReason.MISSING_LAYER, f"layer {name!r} cannot be read")
    with reader:
        block = reader.read(_BLOCK)

    kind = _compression_of(block)
    if kind is not None:
        raise ImageRejected(
            FailureReason.NOT_A_TAR,
            f"layer {name!r} is {kind}-compressed, which `docker load` would decompress "
            "without a size limit; expected the plain tar layers that `docker save` writes",
        )
    if block.count(0) == len(block):
        return
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise ImageRejected(
            FailureReason.NOT_A_TAR,
            f"layer {name!r} does not start with a tar header ({exc}); expected the plain tar "
            "layers that `docker save` writes",
        ) from None


def read_members(
    archive: tarfile.TarFile, file: IO[bytes], *, max_members: int, max_total_size: int
) -> dict[str, tarfile.TarInfo]:
    """Check every header in archive order and return the members by normalized name.

    `file` is the open archive file, used to read raw header blocks. Stops at the first
    member past `max_members` and as soon as the member sizes add up to more than
    `max_total_size` bytes. The archive root entry ("./") is checked but not returned.
    Raises ImageRejected, or tarfile.TarError for an archive that tarfile cannot parse.
    """
    members: dict[str, tarfile.TarInfo] = {}
    count = 0
    total_size = 0
    while (member := archive.next()) is not None:
        count += 1
        if count > max_members:
            raise ImageRejected(
                FailureReason.TOO_MANY_MEMBERS, f"tarball has more than {max_members} members"
            )
        total_size += member.size
        if total_size > max_total_size:
            raise ImageRejected(
                FailureReason.TARBALL_TOO_LARGE,
                f"members add up to more than {max_total_size} bytes",
            )

        # Python applies PAX global headers to later members, Go's archive/tar does not.
        if archive.pax_headers:
            raise ImageRejected(
                FailureReason.SPECIAL_MEMBER, "tarball has a PAX global header, expected none"
            )
        _check_header_format(file, member)
        _check_pax_records(member)
        try:
            name = normalize_member_name(member.name)
        except ValueError as exc:
            raise ImageRejected(FailureReason.UNSAFE_MEMBER_NAME, str(exc)) from None
        _check_member_type(member, name)

        if name == "":
            continue
        if name in members:
            raise ImageRejected(
                FailureReason.DUPLICATE_MEMBER,
                f"member {member.name!r} appears twice, so the later copy would replace the first",
            )
        members[name] = member

    _check_end_of_archive(file, archive.offset)
    return members


def normalize_member_name(raw: str) -> str:
    """Return `raw` without leading "./" parts, or "" for the archive root.

    Raises ValueError naming the problem when the name is empty, absolute, not UTF-8, or
    contains a backslash, a control character, or an empty, "." or ".." component.
    """
    if raw == "":
        raise ValueError("member name is empty")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"name {raw!r} is not valid UTF-8") from None
    if _UNSAFE_CHARACTERS.search(raw):
        raise ValueError(f"name {raw!r} contains a backslash or control character")
    if raw.startswith("/"):
        raise ValueError(f"name {raw!r} is absolute, expected a relative path")

    name = raw
    while name.startswith("./"):
        name = name[2:]
    if name in ("", "."):
        return ""
    for part in name.split("/"):
        if part == "..":
            raise ValueError(f"name {raw!r} contains a '..' component")
        if part in ("", "."):
            raise ValueError(f"name {raw!r} contains an empty or '.' component")
    return name


def read_small_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, *, max_size: int, reason: FailureReason
) -> bytes:
    """Read a regular file member of at most `max_size` bytes, else raise ImageRejected."""
    if not member.isfile():
        raise ImageRejected(reason, f"member {member.name!r} is a directory, expected a file")
    if member.size > max_size:
        raise ImageRejected(
            reason,
            f"member {member.name!r} has {member.size} bytes, expected at most {max_size}",
        )
    reader = archive.extractfile(member)
    if reader is None:
        raise ImageRejected(reason, f"member {member.name!r} cannot be read")
    with reader:
        return reader.read()


def load_json(data: bytes, *, reason: FailureReason, name: str) -> Any:
    """Parse strict UTF-8 JSON, raising ImageRejected with `reason` if it is invalid.

    Duplicate keys are invalid because Go's encoding/json lets the later one override the
    earlier one or merges both objects into one struct, while Python keeps only the later.
    """
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ImageRejected(reason, f"{name!r} is not valid JSON: {exc}") from None


def _check_header_format(file: IO[bytes], member: tarfile.TarInfo) -> None:
    """Reject header formats that Python's tarfile and Go's archive/tar read differently.

    Python joins the 155-byte prefix field to the name in every format. Go joins it only for
    ustar and PAX headers and reads a shorter field in star headers. So only ustar and PAX
    headers are accepted, with at most one PAX extended header.
    """
    header_offset = member.offset_data - _BLOCK
    if member.offset != header_offset:
        extension = _header_at(file, member.offset, member.name)
        chain_end = member.offset + _BLOCK + -(-extension.size // _BLOCK) * _BLOCK
        if extension.type != tarfile.XHDTYPE or chain_end != header_offset:
            raise ImageRejected(
                FailureReason.NOT_A_TAR,
                f"member {member.name!r} has GNU or chained extension headers, "
                "expected at most one PAX extended header",
            )
    _header_at(file, header_offset, member.name)


def _header_at(file: IO[bytes], offset: int, name: str) -> tarfile.TarInfo:
    block = os.pread(file.fileno(), _BLOCK, offset)
    if block[257:265] != _USTAR_MAGIC or block[508:512] == _STAR_TRAILER:
        raise ImageRejected(
            FailureReason.NOT_A_TAR,
            f"member {name!r} has a GNU, v7 or star header, expected POSIX ustar or PAX",
        )
    size_field = block[124:136]
    if not _SIZE_FIELD.fullmatch(size_field):
        raise ImageRejected(
            FailureReason.NOT_A_TAR,
            f"member {name!r} has size field {size_field!r}, which tar readers parse "
            "differently; expected octal digits padded with spaces or NULs at the end",
        )
    return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")


def _check_pax_records(member: tarfile.TarInfo) -> None:
    for key in member.pax_headers:
        if key not in _PAX_KEYS and not key.startswith(_PAX_XATTR_PREFIX):
            raise ImageRejected(
                FailureReason.NOT_A_TAR,
                f"member {member.name!r} has PAX record {key!r}, expected only "
                f"{sorted(_PAX_KEYS)!r} and {_PAX_XATTR_PREFIX}* records",
            )


def _compression_of(head: bytes) -> str | None:
    for magic, kind in _COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def _check_member_type(member: tarfile.TarInfo, name: str) -> None:
    if member.issym() or member.islnk():
        raise ImageRejected(
            FailureReason.LINK_MEMBER,
            f"member {member.name!r} is a link to {member.linkname!r}, "
            "expected a regular file or directory",
        )
    # NOTE: Docker 20.10 saves a layer whose diff ID repeats an earlier layer's as a symlink
    # to the earlier layer.tar, so images with two identical layers are rejected here.
    regular = member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and member.sparse is None
    if not (regular or member.isdir()):
        kind = _SPECIAL_TYPES.get(member.type, f"of tar type {member.type!r}")
        raise ImageRejected(
            FailureReason.SPECIAL_MEMBER,
            f"member {member.name!r} is {kind}, expected a regular file or directory",
        )
    if name == "" and not member.isdir():
        raise ImageRejected(
            FailureReason.UNSAFE_MEMBER_NAME,
            f"member {member.name!r} names the archive root but is not a directory",
        )


def _check_end_of_archive(file: IO[bytes], offset: int) -> None:
    """Reject non-zero bytes after the last member.

    tarfile ends the archive silently at an invalid header, while Go's archive/tar fails
    there. So bytes after the end could hide members that only one of the two reads.
    """
    while chunk := os.pread(file.fileno(), 1024 * 1024, offset):
        if chunk.count(0) != len(chunk):
            raise ImageRejected(
                FailureReason.NOT_A_TAR,
                f"non-zero data or an invalid header after the last member at byte {offset}",
            )
        offset += len(chunk)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"duplicate key {key!r}")
        result[key] = value
    return result
