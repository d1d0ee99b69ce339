"""Header checks on the tar archive inside each image layer, run before `docker load`.

`tarball.inspect_image_tarball` calls `check_layer_entries` for every layer that manifest.json
lists. `docker load` in Docker 20.10 extracts each layer with Go's archive/tar, so this walker
reads the layer's headers as that reader does (Go 1.13 to 1.19, reader.go), in place inside
the outer tarball. It reads every header block and the data of PAX and GNU long-name headers,
and seeks over file data. So a layer is rejected before the daemon writes anything if it
contains:

- a sparse file (GNU type 'S' or PAX GNU.sparse.* records), which Go fills with zeros, so a
  few KiB of layer can write gigabytes;
- a size field that Go and Python read differently, a bad header checksum, a header format
  that Go reads another way, or an entry whose data runs past the end of the layer;
- a device node, FIFO or contiguous file, like the outer tarball's members;
- an absolute name or one with a ".." component, or a hard link whose target is one.

Symbolic links may point anywhere, because the daemon extracts layers chrooted into the
layer's folder. Hard links between entries of the layer stay accepted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import IO

from services.supervisor.errors import FailureReason, ImageRejected

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# The read-ahead window: a layer of small files then costs one read per window, not per header.
_WINDOW = 256 * 1024
# Go's maxSpecialFileSize: longer PAX or GNU long-name data fails in archive/tar.
_MAX_SPECIAL_FILE = 1 << 20
_MAX_INT64 = 2**63 - 1
# Same rule as tar_members._SIZE_FIELD: octal digits after optional spaces, padded at the end
# with spaces or NULs. Go also trims leading NULs and reads base-256, and Python does neither.
_SIZE_FIELD = re.compile(rb" *([0-7]*)[ \x00]*")
_PAX_LENGTH = re.compile(rb"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+")
_OCTAL = re.compile(rb"[0-7]+")
_USTAR_MAGIC = b"ustar\x00"
_GNU_MAGIC = b"ustar  \x00"  # magic and version fields together
_STAR_TRAILER = b"tar\x00"
_SPARSE_PAX_PREFIX = "GNU.sparse."
_NAME_RECORDS = {b"path", b"linkpath", b"uname", b"gname"}

_REGULAR = {b"0", b"\x00"}
_HARD_LINK = b"1"
_SYMLINK = b"2"
_DIRECTORY = b"5"
_PAX_HEADER = b"x"
_GNU_LONG_NAME = b"L"
_GNU_LONG_LINK = b"K"
_EXTENSIONS = {_PAX_HEADER, _GNU_LONG_NAME, _GNU_LONG_LINK}
# Types whose data Go skips whatever their size field contains (isHeaderOnlyType).
_HEADER_ONLY = {_HARD_LINK, _SYMLINK, b"3", b"4", _DIRECTORY, b"6"}
_SPECIAL_TYPES = {
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"S": "a GNU sparse file",
}


@dataclass(frozen=True, kw_only=True)
class LayerEntries:
    """Entry count and data size that one layer's headers declare."""

    count: int  # entries, not counting PAX and GNU long-name headers
    data_size: int  # bytes, sum of the data sizes of the entries


@dataclass
class _Extensions:
    """PAX records and GNU long names read for the next entry, in Go's order of precedence."""

    pax: dict[str, str] | None = None
    long_name: str | None = None
    long_link: str | None = None

    def is_empty(self) -> bool:
        return self.pax is None and self.long_name is None and self.long_link is None


class _LayerReader:
    """Reads byte ranges of one layer, a member of the open outer tarball, in place."""

    def __init__(self, file: IO[bytes], *, offset: int, size: int) -> None:
        self._fd = file.fileno()
        self._start = offset
        self.size = size
        self._window_start = 0
        self._window = b""

    def read(self, position: int, length: int) -> bytes:
        """Return up to `length` bytes at `position` in the layer, fewer at its end."""
        length = max(0, min(length, self.size - position))
        end = position + length
        if self._window_start <= position and end <= self._window_start + len(self._window):
            start = position - self._window_start
            return self._window[start : start + length]
        if length > _WINDOW:
            return os.pread(self._fd, length, self._start + position)
        self._window_start = position
        self._window = os.pread(
            self._fd, min(_WINDOW, self.size - position), self._start + position
        )
        return self._window[:length]


def check_layer_entries(
    file: IO[bytes],
    *,
    layer: str,
    offset: int,
    size: int,
    max_entries: int,
    max_data_size: int,
    data_before: int = 0,
) -> LayerEntries:
    """Walk the tar headers of a layer stored at `offset` in `file`, `size` bytes long.

    Stops at the end-of-archive blocks and ignores anything after them, as Go does.
    `data_before` is the data size of the layers checked earlier. Raises ImageRejected with
    SPECIAL_MEMBER for sparse files, devices, FIFOs and contiguous files, and with
    TOO_MANY_MEMBERS past `max_entries` entries. It raises TARBALL_TOO_LARGE once the data
    sizes add up to more than `max_data_size` bytes, and LAYER_ENTRY_INVALID for anything
    else that this module rejects. Raises OSError if the file cannot be read.
    """
    reader = _LayerReader(file, offset=offset, size=size)
    position = 0
    count = 0
    data_size = 0
    extensions = _Extensions()

    while True:
        block = reader.read(position, _BLOCK)
        if not block:
            break  # Go ends the archive at a clean end of file, with or without zero blocks.
        where = f"layer {layer!r} at byte {position}"
        if len(block) < _BLOCK:
            raise _invalid(f"{where} ends inside a header block; the layer is truncated")
        if block == _ZERO_BLOCK:
            _check_end(reader, position + _BLOCK, where)
            break
        typeflag, name, linkname, entry_size = _parse_header(block, where)
        position += _BLOCK

        if typeflag in _EXTENSIONS:
            data = _read_extension(reader, position, entry_size, typeflag, where)
            _add_extension(extensions, typeflag, data, where)
            position += _padded(entry_size)
            continue

        if extensions.pax is not None:
            name, linkname, entry_size = _apply_pax(
                extensions.pax, name=name, linkname=linkname, size=entry_size, where=where
            )
        name = extensions.long_name or name
        linkname = extensions.long_link or linkname
        extensions = _Extensions()
        if typeflag == b"\x00" and name.endswith("/"):
            typeflag = _DIRECTORY  # how Go reads a directory in an old archive
        _check_entry(typeflag, name, linkname, where)

        count += 1
        if count > max_entries:
            raise ImageRejected(
                FailureReason.TOO_MANY_MEMBERS,
                f"layer {layer!r} has more than {max_entries} entries",
            )
        if typeflag not in _HEADER_ONLY:
            data_size += entry_size
            position += _padded(entry_size)
        if data_before + data_size > max_data_size:
            raise ImageRejected(
                FailureReason.TARBALL_TOO_LARGE,
                f"layer {layer!r} brings the file data of all layers to more than "
                f"{max_data_size} bytes (--image-max-size)",
            )
        if position > reader.size:
            raise _invalid(f"{where}: the data of {name!r} runs past the end of the layer")

    if not extensions.is_empty():
        raise _invalid(f"layer {layer!r} ends after a PAX or GNU long-name header, not an entry")
    return LayerEntries(count=count, data_size=data_size)


def _invalid(message: str) -> ImageRejected:
    return ImageRejected(FailureReason.LAYER_ENTRY_INVALID, message)


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _check_end(reader: _LayerReader, position: int, where: str) -> None:
    """Check the block after a zero block: Go fails unless it is missing or zero as well."""
    block = reader.read(position, _BLOCK)
    if block and block != _ZERO_BLOCK:
        raise _invalid(
            f"{where} has a zero block followed by a non-zero block, which Go's archive/tar "
            "rejects; expected two zero blocks at the end of the archive"
        )


def _parse_header(block: bytes, where: str) -> tuple[bytes, str, str, int]:
    """Return the type, name, link name and size of a header block, as Go reads them."""
    _check_checksum(block, where)

    magic = block[257:263]
    if magic == _USTAR_MAGIC and block[508:512] == _STAR_TRAILER:
        raise _invalid(f"{where} has a star header, expected ustar, PAX or GNU")
    if magic != _USTAR_MAGIC and block[257:265] != _GNU_MAGIC and any(block[257:265]):
        raise _invalid(f"{where} has magic {block[257:265]!r}, expected ustar, PAX or GNU")

    name = _parse_string(block[0:100])
    if magic == _USTAR_MAGIC:
        # Go joins the prefix field in ustar and PAX headers only, where GNU headers store
        # access and change times.
        prefix = _parse_string(block[345:500])
        if prefix:
            name = f"{prefix}/{name}"

    size_field = block[124:136]
    match = _SIZE_FIELD.fullmatch(size_field)
    if match is None:
        raise _invalid(
            f"{where}: entry {name!r} has size field {size_field!r}, which tar readers parse "
            "differently; expected octal digits padded with spaces or NULs at the end"
        )
    size = int(match.group(1) or b"0", 8)
    return block[156:157], name, _parse_string(block[157:257]), size


def _check_checksum(block: bytes, where: str) -> None:
    """Raise unless the checksum field matches the unsigned or signed sum, as in Go."""
    field = block[148:156].strip(b" \x00")
    unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
    if _OCTAL.fullmatch(field) is not None:
        expected = int(field, 8)
        if expected == unsigned:
            return
        # Some old writers summed signed bytes. Each byte from 0x80 up then counts 256 less.
        high_bytes = sum(1 for byte in block[:148] + block[156:] if byte >= 0x80)
        if expected == unsigned - 256 * high_bytes:
            return
    raise _invalid(
        f"{where}: header checksum {block[148:156]!r} does not match the header "
        f"(sum {unsigned}); the layer is corrupt or not a tar archive"
    )


def _parse_string(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _read_extension(
    reader: _LayerReader, position: int, size: int, typeflag: bytes, where: str
) -> bytes:
    if size > _MAX_SPECIAL_FILE:
        raise _invalid(
            f"{where}: {typeflag!r} header has {size} bytes of data, over the "
            f"{_MAX_SPECIAL_FILE} bytes that Go's archive/tar reads"
        )
    data = reader.read(position, size)
    if len(data) < size:
        raise _invalid(f"{where}: {typeflag!r} header data runs past the end of the layer")
    return data


def _add_extension(extensions: _Extensions, typeflag: bytes, data: bytes, where: str) -> None:
    """Store an extension header for the next entry, rejecting a second one of its type.

    Go lets a later extension header of the same type replace the earlier one, and no tar
    writer emits two, so only one of each type is accepted.
    """
    if typeflag == _PAX_HEADER and extensions.pax is None:
        extensions.pax = _parse_pax(data, where)
    elif typeflag == _GNU_LONG_NAME and extensions.long_name is None:
        extensions.long_name = _parse_string(data)
    elif typeflag == _GNU_LONG_LINK and extensions.long_link is None:
        extensions.long_link = _parse_string(data)
    else:
        raise _invalid(f"{where}: second {typeflag!r} header before one entry, expected one")


_TRUSTED_XATTR_PREFIXES = ("SCHILY.xattr.trusted.", "LIBARCHIVE.xattr.trusted.")


def _parse_pax(data: bytes, where: str) -> dict[str, str]:
    """Parse PAX records as Go's parsePAX does, rejecting what Go rejects and sparse records."""
    records: dict[str, str] = {}
    rest = data
    while rest:
        length_field, space, _ = rest.partition(b" ")
        length = int(length_field) if space and _PAX_LENGTH.fullmatch(length_field) else 0
        record = rest[len(length_field) + 1 : length - 1]
        key, equals, value = record.partition(b"=")
        if length < 5 or length > len(rest) or rest[length - 1 : length] != b"\n" or not equals:
            raise _invalid(f"{where}: PAX record {rest[:80]!r} is malformed")
        # Go's validPAXRecord: binary values such as xattrs may contain NULs, names may not.
        if not key or b"\x00" in key or (key in _NAME_RECORDS and b"\x00" in value):
            raise _invalid(f"{where}: PAX record {record[:80]!r} has an empty key or a NUL")
        text_key = key.decode("utf-8", "surrogateescape")
        if text_key.startswith(_SPARSE_PAX_PREFIX):
            raise ImageRejected(
                FailureReason.SPECIAL_MEMBER,
                f"{where}: PAX record {text_key!r} marks a sparse file, which `docker load` "
                "would fill with zeros on disk; expected no sparse files in layers",
            )
        if text_key.startswith(_TRUSTED_XATTR_PREFIXES):
            # Docker applies xattrs to its overlay2 layer folders, where overlayfs reads the
            # trusted.overlay.* ones (opaque directories, redirects) as its own metadata.
            raise _invalid(
                f"{where}: PAX record {text_key!r} sets a trusted.* extended attribute; "
                "expected no trusted or security namespace attributes in layers"
            )
        records[text_key] = value.decode("utf-8", "surrogateescape")
        rest = rest[length:]
    return records


def _apply_pax(
    records: dict[str, str], *, name: str, linkname: str, size: int, where: str
) -> tuple[str, str, int]:
    """Return the name, link name and size after PAX records, as Go's mergePAX sets them.

    Go keeps the header's value for a record with an empty value.
    """
    name = records.get("path") or name
    linkname = records.get("linkpath") or linkname
    pax_size = records.get("size")
    if pax_size:
        if _DECIMAL.fullmatch(pax_size) is None or int(pax_size) > _MAX_INT64:
            raise _invalid(
                f"{where}: PAX size {pax_size!r} of entry {name!r} is not a decimal size; expected "
                "digits only, at most 2**63 - 1"
            )
        size = int(pax_size)
    return name, linkname, size


def _check_entry(typeflag: bytes, name: str, linkname: str, where: str) -> None:
    kind = _SPECIAL_TYPES.get(typeflag)
    if kind is not None:
        raise ImageRejected(
            FailureReason.SPECIAL_MEMBER,
            f"{where}: entry {name!r} is {kind}, which `docker load` would create; "
            "expected regular files, directories and links only",
        )
    if typeflag not in _REGULAR | {_HARD_LINK, _SYMLINK, _DIRECTORY}:
        raise _invalid(
            f"{where}: entry {name!r} has tar type {typeflag!r}, expected a regular file, "
            "directory, symbolic link or hard link"
        )
    problem = _path_problem(name)
    if problem:
        raise _invalid(f"{where}: entry name {name!r} {problem}")
    if typeflag == _HARD_LINK:
        problem = _path_problem(linkname)
        if problem:
            raise _invalid(f"{where}: hard link {name!r} has target {linkname!r}, which {problem}")


def _path_problem(path: str) -> str | None:
    """Return why a name or hard link target is unsafe, or None if it is a relative path."""
    if not path:
        return "is empty"
    if path.startswith("/"):
        return "is absolute, expected a path relative to the layer root"
    if ".." in path.split("/"):
        return "has a '..' component"
    return None
