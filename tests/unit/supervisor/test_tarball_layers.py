"""Tests for the checks on the tar headers inside each layer of an image tarball.

Each layer is built with tarfile where it can write the case and patched by hand where it
cannot, then stored as the layer.tar of the legacy `docker save` layout of test_tarball.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.layer_entries import check_layer_entries
from services.supervisor.tarball import TarballLimits, inspect_image_tarball
from tests.unit.supervisor.test_tarball import LAYER_ID, legacy_members, replace, write_tar

LIMITS = TarballLimits()
LAYER_NAME = f"{LAYER_ID}/layer.tar"
BLOCK = tarfile.BLOCKSIZE
END = bytes(2 * BLOCK)
LONG_NAME = "usr/lib/" + "x" * 120 + "/module.py"


def entry(
    name: str,
    data: bytes = b"",
    *,
    kind: bytes = tarfile.REGTYPE,
    linkname: str = "",
    pax: dict[str, str] | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.pax_headers = pax or {}
    return info, data


def layer(
    *entries: tuple[tarfile.TarInfo, bytes],
    tar_format: int = tarfile.PAX_FORMAT,
    pax_headers: dict[str, str] | None = None,
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=tar_format, pax_headers=pax_headers
    ) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def header(name: str, *, size: int = 0, kind: bytes = tarfile.REGTYPE) -> bytearray:
    """Return a ustar header block to patch; call `with_checksum` after patching."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = 0o644
    return bytearray(info.tobuf(tarfile.USTAR_FORMAT))


def with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def header_only(name: str) -> bytes:
    return with_checksum(header(name))


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def image(path: Path, layer_data: bytes, *, listed: int = 1, name: str = "image.tar") -> Path:
    """Write a legacy image tarball whose one layer is `layer_data`, listed `listed` times."""
    members = replace(legacy_members(), LAYER_NAME, layer_data)
    if listed != 1:
        manifest = [
            {"Config": members[4].info.name, "RepoTags": [], "Layers": [LAYER_NAME] * listed}
        ]
        members = replace(members, "manifest.json", json.dumps(manifest).encode())
    return write_tar(path / name, members)


# ---------------------------------------------------------------------------------------------
# Layers that real tools write


def busybox_like() -> bytes:
    """Return a layer shaped like Docker's export of a busybox image."""
    busybox = entry("bin/busybox", b"\x7fELF" + bytes(5000))
    return layer(
        entry("bin/", kind=tarfile.DIRTYPE),
        busybox,
        entry("bin/sh", kind=tarfile.SYMTYPE, linkname="/bin/busybox"),
        entry("bin/ls", kind=tarfile.SYMTYPE, linkname="busybox"),
        entry("bin/cat", kind=tarfile.LNKTYPE, linkname="bin/busybox"),
        entry("etc/", kind=tarfile.DIRTYPE),
        entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        entry("etc/.wh.shadow"),
        entry("tmp/.wh..wh..opq"),
    )


def pax_records() -> bytes:
    records = {
        "mtime": "1700000000.123456789",
        "atime": "1700000000.5",
        "ctime": "1700000000.5",
        "uid": "3000000",
        "gid": "3000000",
        "uname": "ünïcode",
        "gname": "staff",
        "size": "5",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        "LIBARCHIVE.xattr.user.comment": "aGVsbG8=",
    }
    return layer(entry(LONG_NAME, b"hello", pax=records), entry("x" * 150, b"data"))


def gnu_long_names() -> bytes:
    return layer(
        entry(LONG_NAME, b"data"),
        entry(LONG_NAME + ".link", kind=tarfile.SYMTYPE, linkname="/" + LONG_NAME),
        entry("hard", kind=tarfile.LNKTYPE, linkname=LONG_NAME),
        tar_format=tarfile.GNU_FORMAT,
    )


def ustar_prefix() -> bytes:
    name = "a" * 60 + "/" + "b" * 60 + "/" + "c" * 60
    data = layer(entry(name, b"data"), tar_format=tarfile.USTAR_FORMAT)
    assert data[345:346] == b"a"  # tarfile split the name into prefix and name fields
    return data


def untyped_entries() -> bytes:
    return layer(
        entry("old-dir/", kind=tarfile.AREGTYPE),
        entry("old-dir/file", b"data", kind=tarfile.AREGTYPE),
        tar_format=tarfile.USTAR_FORMAT,
    )


def v7_header() -> bytes:
    block = header("v7-file", size=4)
    block[257:265] = bytes(8)
    block[265:345] = bytes(80)
    return with_checksum(block) + padded(b"data") + END


def signed_checksum() -> bytes:
    block = header("caf\xe9")
    block[3] = 0xE9
    block[148:156] = b" " * 8
    signed = sum(byte - 256 if byte >= 0x80 else byte for byte in block)
    block[148:156] = b"%06o\x00 " % signed
    return bytes(block) + END


def dot_prefixed() -> bytes:
    return layer(
        entry("./", kind=tarfile.DIRTYPE),
        entry("./bin/busybox", b"elf"),
        entry("./bin/sh", kind=tarfile.LNKTYPE, linkname="./bin/busybox"),
    )


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(busybox_like, id="busybox-symlinks-hard-links-whiteouts"),
        pytest.param(pax_records, id="pax-records"),
        pytest.param(gnu_long_names, id="gnu-long-name-and-link"),
        pytest.param(ustar_prefix, id="ustar-prefix"),
        pytest.param(untyped_entries, id="untyped-regular-and-directory"),
        pytest.param(v7_header, id="v7-header"),
        pytest.param(signed_checksum, id="signed-checksum"),
        pytest.param(dot_prefixed, id="dot-prefixed-names"),
        pytest.param(lambda: b"", id="empty-file"),
        pytest.param(lambda: bytes(BLOCK), id="one-zero-block"),
        pytest.param(lambda: busybox_like() + b"trailing garbage", id="data-after-end"),
        pytest.param(lambda: busybox_like()[: -len(END)], id="no-end-blocks"),
    ],
)
def test_accepts_layer(build: Callable[[], bytes], tmp_path: Path) -> None:
    result = inspect_image_tarball(image(tmp_path, build()), limits=LIMITS)

    assert result.layer_count == 1


def test_counts_entries_and_data_in_place(tmp_path: Path) -> None:
    data = busybox_like()
    path = tmp_path / "outer"
    path.write_bytes(b"x" * 1536 + data + b"y" * 512)

    with path.open("rb") as file:
        entries = check_layer_entries(
            file, layer="l", offset=1536, size=len(data), max_entries=100, max_data_size=10**6
        )

    assert (entries.count, entries.data_size) == (9, 5004 + 30)


# ---------------------------------------------------------------------------------------------
# Rejected layers


def sparse_pax_1_0() -> bytes:
    sparse_map = b"1\n1023\n1\n"
    data = padded(sparse_map) + b"x"
    records = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "sparse",
        "GNU.sparse.realsize": str(1 << 30),
    }
    return layer(entry("GNUSparseFile.0/sparse", data, pax=records))


def sparse_pax_0_1() -> bytes:
    records = {"GNU.sparse.size": str(1 << 30), "GNU.sparse.numblocks": "1"}
    records["GNU.sparse.map"] = f"{(1 << 30) - 1},1"
    return layer(entry("sparse", b"x", pax=records))


def trusted_overlay_xattr() -> bytes:
    # Marks a directory opaque for overlayfs, hiding the lower layers' files below it.
    return layer(entry("etc/", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}))


def sparse_pax_0_0() -> bytes:
    records = {"GNU.sparse.offset": str((1 << 30) - 1), "GNU.sparse.numbytes": "1"}
    return layer(entry("sparse", b"x", pax=records))


def sparse_gnu_type() -> bytes:
    block = bytearray(entry("sparse", b"x")[0].tobuf(tarfile.GNU_FORMAT))
    block[156:157] = tarfile.GNUTYPE_SPARSE
    return with_checksum(block) + padded(b"x") + END


def size_field(field: bytes) -> Callable[[], bytes]:
    """Return a builder of a layer whose second header has `field` as its size field.

    The first header is valid, because a layer whose first block tarfile cannot parse is
    rejected as not_a_tar before its entries are read.
    """

    def build() -> bytes:
        block = header("file", size=4)
        block[124:136] = field
        return header_only("first") + with_checksum(block) + padded(b"data") + END

    return build


def pax_size(value: str) -> Callable[[], bytes]:
    return lambda: layer(entry("file", b"data", pax={"size": value}))


def bad_checksum() -> bytes:
    data = bytearray(busybox_like())
    data[BLOCK + 1] ^= 1  # inside bin/busybox's name
    return bytes(data)


def member_of_kind(kind: bytes, name: str = "dev/node", linkname: str = "") -> Callable[[], bytes]:
    return lambda: layer(entry(name, kind=kind, linkname=linkname))


def hard_link(target: str) -> Callable[[], bytes]:
    return lambda: layer(entry("etc/shadow-link", kind=tarfile.LNKTYPE, linkname=target))


def named(name: str, tar_format: int = tarfile.PAX_FORMAT) -> Callable[[], bytes]:
    return lambda: layer(entry(name, b"data"), tar_format=tar_format)


def prefix_dotdot() -> bytes:
    block = header("file")
    block[345:347] = b".."
    return with_checksum(block) + END


def truncated_data() -> bytes:
    return layer(entry("file", b"data"))[: BLOCK + 4]


def truncated_header() -> bytes:
    return busybox_like()[:700]


def zero_block_then_header() -> bytes:
    return layer(entry("a", b"data"))[: 2 * BLOCK] + bytes(BLOCK) + layer(entry("b"))


def star_header() -> bytes:
    block = header("file")
    block[508:512] = b"tar\x00"
    return with_checksum(block) + END


def unknown_magic() -> bytes:
    block = header("file")
    block[257:263] = b"pwned\x00"
    return with_checksum(block) + END


def two_pax_headers() -> bytes:
    first = layer(entry("a", pax={"path": "innocent"}))
    second = layer(entry("b", pax={"path": "other"}))
    return first[: 2 * BLOCK] + second


def pax_malformed(records: bytes) -> Callable[[], bytes]:
    def build() -> bytes:
        block = header("PaxHeaders/file", size=len(records), kind=tarfile.XHDTYPE)
        return with_checksum(block) + padded(records) + layer(entry("file"))

    return build


def pax_too_long() -> bytes:
    return layer(entry("file", pax={"comment": "x" * (1 << 20)}))


def extension_without_entry() -> bytes:
    return layer(entry(LONG_NAME), tar_format=tarfile.GNU_FORMAT)[: 2 * BLOCK] + END


REJECTED = [
    pytest.param(sparse_pax_1_0, FailureReason.SPECIAL_MEMBER, "GNU.sparse.", id="sparse-pax-1.0"),
    pytest.param(sparse_pax_0_1, FailureReason.SPECIAL_MEMBER, "GNU.sparse.", id="sparse-pax-0.1"),
    pytest.param(sparse_pax_0_0, FailureReason.SPECIAL_MEMBER, "GNU.sparse.", id="sparse-pax-0.0"),
    pytest.param(sparse_gnu_type, FailureReason.SPECIAL_MEMBER, "sparse file", id="sparse-gnu"),
    pytest.param(
        trusted_overlay_xattr,
        FailureReason.LAYER_ENTRY_INVALID,
        "trusted.*",
        id="trusted-overlay-xattr",
    ),
    pytest.param(
        size_field(b"\x0000000000004"),
        FailureReason.LAYER_ENTRY_INVALID,
        "size field",
        id="size-leading-nul",
    ),
    pytest.param(
        size_field(b"0000 0000004"),
        FailureReason.LAYER_ENTRY_INVALID,
        "size field",
        id="size-inner-space",
    ),
    pytest.param(
        size_field(b"\x80" + bytes(10) + b"\x04"),
        FailureReason.LAYER_ENTRY_INVALID,
        "size field",
        id="size-base-256",
    ),
    pytest.param(
        size_field(b"\xff" * 12),
        FailureReason.LAYER_ENTRY_INVALID,
        "size field",
        id="size-negative-base-256",
    ),
    pytest.param(
        size_field(b"0000000000-4"),
        FailureReason.LAYER_ENTRY_INVALID,
        "size field",
        id="size-minus-sign",
    ),
    pytest.param(pax_size("-4"), FailureReason.LAYER_ENTRY_INVALID, "PAX size", id="pax-size-neg"),
    pytest.param(pax_size("+4"), FailureReason.LAYER_ENTRY_INVALID, "PAX size", id="pax-size-plus"),
    pytest.param(
        pax_size(str(2**63)), FailureReason.LAYER_ENTRY_INVALID, "PAX size", id="pax-size-overflow"
    ),
    pytest.param(bad_checksum, FailureReason.LAYER_ENTRY_INVALID, "checksum", id="bad-checksum"),
    pytest.param(
        member_of_kind(tarfile.CHRTYPE),
        FailureReason.SPECIAL_MEMBER,
        "character device",
        id="character-device",
    ),
    pytest.param(
        member_of_kind(tarfile.BLKTYPE),
        FailureReason.SPECIAL_MEMBER,
        "block device",
        id="block-device",
    ),
    pytest.param(member_of_kind(tarfile.FIFOTYPE), FailureReason.SPECIAL_MEMBER, "FIFO", id="fifo"),
    pytest.param(
        member_of_kind(tarfile.CONTTYPE),
        FailureReason.SPECIAL_MEMBER,
        "contiguous",
        id="contiguous-file",
    ),
    pytest.param(
        member_of_kind(b"D"), FailureReason.LAYER_ENTRY_INVALID, "tar type", id="gnu-dumpdir"
    ),
    pytest.param(
        lambda: layer(entry("file"), pax_headers={"comment": "global"}),
        FailureReason.LAYER_ENTRY_INVALID,
        "tar type",
        id="pax-global-header",
    ),
    pytest.param(
        hard_link("/etc/shadow"),
        FailureReason.LAYER_ENTRY_INVALID,
        "absolute",
        id="hard-link-absolute",
    ),
    pytest.param(
        hard_link("etc/../../shadow"),
        FailureReason.LAYER_ENTRY_INVALID,
        "'..'",
        id="hard-link-dotdot",
    ),
    pytest.param(
        named("/etc/passwd"), FailureReason.LAYER_ENTRY_INVALID, "absolute", id="absolute-name"
    ),
    pytest.param(named("../escape"), FailureReason.LAYER_ENTRY_INVALID, "'..'", id="dotdot-name"),
    pytest.param(
        named("a/" * 60 + "../escape"),
        FailureReason.LAYER_ENTRY_INVALID,
        "'..'",
        id="dotdot-pax-path",
    ),
    pytest.param(
        named("a/" * 60 + "../escape", tarfile.GNU_FORMAT),
        FailureReason.LAYER_ENTRY_INVALID,
        "'..'",
        id="dotdot-gnu-long-name",
    ),
    pytest.param(prefix_dotdot, FailureReason.LAYER_ENTRY_INVALID, "'..'", id="dotdot-prefix"),
    pytest.param(
        truncated_data, FailureReason.LAYER_ENTRY_INVALID, "past the end", id="truncated-data"
    ),
    pytest.param(
        truncated_header, FailureReason.LAYER_ENTRY_INVALID, "truncated", id="truncated-header"
    ),
    pytest.param(
        zero_block_then_header,
        FailureReason.LAYER_ENTRY_INVALID,
        "zero block",
        id="zero-block-then-header",
    ),
    pytest.param(star_header, FailureReason.LAYER_ENTRY_INVALID, "star", id="star-header"),
    pytest.param(unknown_magic, FailureReason.LAYER_ENTRY_INVALID, "magic", id="unknown-magic"),
    pytest.param(
        two_pax_headers, FailureReason.LAYER_ENTRY_INVALID, "second", id="two-pax-headers"
    ),
    pytest.param(
        pax_malformed(b"99 path=x\n"),
        FailureReason.LAYER_ENTRY_INVALID,
        "malformed",
        id="pax-length-too-long",
    ),
    pytest.param(
        pax_malformed(b"10 path=x\n\x00\x00"),
        FailureReason.LAYER_ENTRY_INVALID,
        "malformed",
        id="pax-trailing-nul",
    ),
    pytest.param(
        pax_malformed(b"+9 path=x\n"),
        FailureReason.LAYER_ENTRY_INVALID,
        "malformed",
        id="pax-signed-length",
    ),
    pytest.param(
        pax_malformed(b"10 path x\n"),
        FailureReason.LAYER_ENTRY_INVALID,
        "malformed",
        id="pax-no-equals",
    ),
    pytest.param(
        pax_malformed(b"12 path=a\x00b\n"),
        FailureReason.LAYER_ENTRY_INVALID,
        "NUL",
        id="pax-nul-in-path",
    ),
    pytest.param(pax_too_long, FailureReason.LAYER_ENTRY_INVALID, "bytes of data", id="pax-1mib"),
    pytest.param(
        extension_without_entry,
        FailureReason.LAYER_ENTRY_INVALID,
        "not an entry",
        id="long-name-without-entry",
    ),
]


@pytest.mark.parametrize(("build", "reason", "detail"), REJECTED)
def test_rejects_layer(
    build: Callable[[], bytes], reason: FailureReason, detail: str, tmp_path: Path
) -> None:
    with pytest.raises(ImageRejected) as error:
        inspect_image_tarball(image(tmp_path, build()), limits=LIMITS)

    assert error.value.reason == reason
    assert detail in error.value.message
    assert LAYER_NAME in error.value.message or "PAX size" in error.value.message


def test_rejects_layer_over_entry_limit(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected) as error:
        inspect_image_tarball(
            image(tmp_path, busybox_like()), limits=TarballLimits(max_layer_entries=8)
        )

    assert error.value.reason == FailureReason.TOO_MANY_MEMBERS
    assert f"layer {LAYER_NAME!r} has more than 8 entries" in error.value.message


def test_rejects_layer_listed_twice_over_total_size(tmp_path: Path) -> None:
    path = image(tmp_path, layer(entry("big", bytes(100_000))), listed=2)
    limits = TarballLimits(max_total_size=150_000)
    once = image(tmp_path, layer(entry("big", bytes(100_000))), name="once.tar")
    inspect_image_tarball(once, limits=limits)

    with pytest.raises(ImageRejected) as error:
        inspect_image_tarball(path, limits=limits)

    assert error.value.reason == FailureReason.TARBALL_TOO_LARGE
    assert "more than 150000 bytes (--image-max-size)" in error.value.message
