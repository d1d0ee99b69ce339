"""Tests for the image tarball structure checks that run before `docker load`.

Tarballs are built with tarfile in tmp_path. The legacy layout copies the member names,
order and contents of a real `docker save` from Docker 20.10, and the OCI layout follows what
Docker 25 and later write.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.tarball import TarballLimits, inspect_image_tarball

LIMITS = TarballLimits()
LAYER = bytes(1024)  # an empty tar archive, which is a valid layer
LAYER_HEX = hashlib.sha256(LAYER).hexdigest()
LAYER_ID = "a39210ac" * 8  # legacy v1 layer ID, the folder name in the legacy layout
CONFIG: dict[str, Any] = {
    "architecture": "amd64",
    "os": "linux",
    "config": {"Cmd": ["/bin/busybox", "sh"], "Entrypoint": None, "WorkingDir": ""},
    "rootfs": {"type": "layers", "diff_ids": [f"sha256:{LAYER_HEX}"]},
}
OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class Member(NamedTuple):
    info: tarfile.TarInfo
    data: bytes


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CONFIG_BYTES = _json(CONFIG)
CONFIG_DIGEST = f"sha256:{_sha256(CONFIG_BYTES)}"


def file(name: str, data: bytes = b"") -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return Member(info, data)


def directory(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return Member(info, b"")


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return Member(info, b"")


def blob(data: bytes) -> Member:
    return file(f"blobs/sha256/{_sha256(data)}", data)


def write_tar(
    path: Path,
    members: list[Member],
    *,
    tar_format: int = tarfile.PAX_FORMAT,
    pax_headers: dict[str, str] | None = None,
) -> Path:
    with tarfile.open(path, "w", format=tar_format, pax_headers=pax_headers) as archive:
        for member in members:
            archive.addfile(member.info, io.BytesIO(member.data) if member.data else None)
    return path


def legacy_members(
    *,
    config: bytes = CONFIG_BYTES,
    config_name: str | None = None,
    manifest: Any = None,
    prefix: str = "",
) -> list[Member]:
    """Return the members of a Docker 20.10 save of a one-layer image tagged agent:1."""
    config_name = config_name or f"{_sha256(config)}.json"
    if manifest is None:
        manifest = [
            {"Config": config_name, "RepoTags": ["agent:1"], "Layers": [f"{LAYER_ID}/layer.tar"]}
        ]
    return [
        directory(f"{prefix}{LAYER_ID}"),
        file(f"{prefix}{LAYER_ID}/VERSION", b"1.0"),
        file(f"{prefix}{LAYER_ID}/json", _json({"id": LAYER_ID, "os": "linux"})),
        file(f"{prefix}{LAYER_ID}/layer.tar", LAYER),
        file(f"{prefix}{config_name}", config),
        file(f"{prefix}manifest.json", _json(manifest)),
        file(f"{prefix}repositories", _json({"agent": {"1": LAYER_ID}})),
    ]


def oci_manifest(config_digest: str = CONFIG_DIGEST) -> bytes:
    return _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(CONFIG_BYTES),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": f"sha256:{LAYER_HEX}",
                    "size": len(LAYER),
                }
            ],
        }
    )


def oci_index(*manifests: bytes) -> bytes:
    descriptors = [
        {
            "mediaType": OCI_MANIFEST_TYPE,
            "digest": f"sha256:{_sha256(manifest)}",
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": "1"},
        }
        for manifest in manifests
    ]
    return _json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": descriptors,
        }
    )


def oci_members(*, tagged: bool = True, config: bytes = CONFIG_BYTES) -> list[Member]:
    """Return the members of a Docker 25 save of a one-layer image.

    Docker 25 and later also write a legacy config blob per layer that nothing refers to,
    and Docker 25.0 leaves an untagged image's manifest out of index.json.
    """
    manifest = oci_manifest()
    legacy_config = _json({"id": LAYER_ID, "created": "1970-01-01T00:00:00Z", "os": "linux"})
    entry = {
        "Config": f"blobs/sha256/{_sha256(config)}",
        "RepoTags": ["agent:1"] if tagged else None,
        "Layers": [f"blobs/sha256/{LAYER_HEX}"],
        "LayerSources": {
            f"sha256:{LAYER_HEX}": {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "size": len(LAYER),
                "digest": f"sha256:{LAYER_HEX}",
            }
        },
    }
    return [
        directory("blobs"),
        directory("blobs/sha256"),
        blob(config),
        blob(legacy_config),
        blob(LAYER),
        blob(manifest),
        file("index.json", oci_index(manifest) if tagged else oci_index()),
        file("manifest.json", _json([entry])),
        file("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
    ]


def replace(members: list[Member], name: str, data: bytes) -> list[Member]:
    return [file(name, data) if m.info.name == name else m for m in members]


def without(members: list[Member], name: str) -> list[Member]:
    return [m for m in members if m.info.name != name]


# One builder per accepted layout.


def good_legacy(path: Path) -> Path:
    return write_tar(path, legacy_members())


def good_legacy_dot_prefixed(path: Path) -> Path:
    return write_tar(path, [directory("."), *legacy_members(prefix="./")])


def good_legacy_untagged(path: Path) -> Path:
    manifest = [
        {
            "Config": f"{_sha256(CONFIG_BYTES)}.json",
            "RepoTags": None,
            "Layers": [f"{LAYER_ID}/layer.tar"],
        }
    ]
    return write_tar(path, without(legacy_members(manifest=manifest), "repositories"))


def good_legacy_pax_header(path: Path) -> Path:
    members = legacy_members()
    members[3].info.pax_headers = {"comment": "forces a PAX extended header"}
    return write_tar(path, members)


def good_legacy_pax_xattr(path: Path) -> Path:
    members = legacy_members()
    members[3].info.pax_headers = {"SCHILY.xattr.user.origin": "build"}
    return write_tar(path, members)


def good_legacy_file_layer(path: Path) -> Path:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(file("bin/agent", b"#!/bin/sh\n").info, io.BytesIO(b"#!/bin/sh\n"))
    return write_tar(path, replace(legacy_members(), f"{LAYER_ID}/layer.tar", layer.getvalue()))


def good_oci(path: Path) -> Path:
    return write_tar(path, oci_members())


def good_oci_untagged(path: Path) -> Path:
    return write_tar(path, oci_members(tagged=False))


@pytest.mark.parametrize(
    ("build", "repo_tags"),
    [
        pytest.param(good_legacy, ("agent:1",), id="legacy"),
        pytest.param(good_legacy_dot_prefixed, ("agent:1",), id="legacy-dot-prefixed"),
        pytest.param(good_legacy_untagged, (), id="legacy-untagged"),
        pytest.param(good_legacy_pax_header, ("agent:1",), id="legacy-pax-header"),
        pytest.param(good_legacy_pax_xattr, ("agent:1",), id="legacy-pax-xattr"),
        pytest.param(good_legacy_file_layer, ("agent:1",), id="legacy-file-layer"),
        pytest.param(good_oci, ("agent:1",), id="oci"),
        pytest.param(good_oci_untagged, (), id="oci-untagged-docker-25.0"),
    ],
)
def test_accepts_docker_save_layout(
    build: Callable[[Path], Path], repo_tags: tuple[str, ...], tmp_path: Path
) -> None:
    image = inspect_image_tarball(build(tmp_path / "image.tar"), limits=LIMITS)

    assert image.config_digest == CONFIG_DIGEST
    assert image.repo_tags == repo_tags
    assert image.config == CONFIG
    assert image.layer_count == 1


# One builder per failure mode.


def parent_component(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file("../escape", b"x")])


def parent_component_inside(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file("./blobs/../../escape", b"x")])


def absolute_name(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file("/etc/cron.d/escape", b"x")])


def empty_component(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file("blobs//escape", b"x")])


def backslash_name(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file("..\\escape", b"x")])


def control_character_name(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file("manifest.json\n", b"x")])


def root_as_file(path: Path) -> Path:
    return write_tar(path, [file("./", b""), *legacy_members()])


def symlink(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), special("escape", tarfile.SYMTYPE, "/etc/passwd")])


def hard_link(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), special("copy", tarfile.LNKTYPE, "manifest.json")])


def character_device(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), special("null", tarfile.CHRTYPE)])


def block_device(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), special("sda", tarfile.BLKTYPE)])


def fifo(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), special("pipe", tarfile.FIFOTYPE)])


def contiguous_file(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), special("contiguous", tarfile.CONTTYPE)])


def unexpected_file(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file("notes.txt", b"hello")])


def unexpected_directory(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), directory("extra")])


def unexpected_layer_sidecar(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file(f"{LAYER_ID}/extra", b"x")])


def duplicate_member(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file("manifest.json", b"[]")])


def duplicate_after_normalizing(path: Path) -> Path:
    return write_tar(path, [*legacy_members(), file("./manifest.json", b"[]")])


def gzip_compressed(path: Path) -> Path:
    path.write_bytes(gzip.compress(good_legacy(path).read_bytes()))
    return path


def bzip2_compressed(path: Path) -> Path:
    path.write_bytes(bz2.compress(good_legacy(path).read_bytes()))
    return path


def xz_compressed(path: Path) -> Path:
    path.write_bytes(lzma.compress(good_legacy(path).read_bytes()))
    return path


def zstd_magic(path: Path) -> Path:
    path.write_bytes(b"\x28\xb5\x2f\xfd" + good_legacy(path).read_bytes())
    return path


def html_page(path: Path) -> Path:
    path.write_bytes(b"<!DOCTYPE html><html><body>Sign in to continue</body></html>\n" * 20)
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def gnu_headers(path: Path) -> Path:
    return write_tar(path, legacy_members(), tar_format=tarfile.GNU_FORMAT)


def gnu_long_name_in_ustar_header(path: Path) -> Path:
    """Write manifest.json under the name "decoy" behind a GNU long-name header."""
    members = legacy_members()
    long_name = tarfile.TarInfo("././@LongLink")
    long_name.type = tarfile.GNUTYPE_LONGNAME
    payload = b"manifest.json\0"
    long_name.size = len(payload)
    padding = bytes(-len(payload) % tarfile.BLOCKSIZE)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for member in members[:-2]:
            archive.addfile(member.info, io.BytesIO(member.data))
        raw = long_name.tobuf(tarfile.USTAR_FORMAT) + payload + padding
        archive.fileobj.write(raw)
        archive.offset += len(raw)
        manifest = members[-2]
        manifest.info.name = "decoy"
        archive.addfile(manifest.info, io.BytesIO(manifest.data))
    return path


def pax_global_header(path: Path) -> Path:
    return write_tar(path, legacy_members(), pax_headers={"path": "manifest.json"})


def data_after_end(path: Path) -> Path:
    good_legacy(path)
    with path.open("ab") as tail:
        tail.write(b"hidden member" * 100)
    return path


def corrupt_second_header(path: Path) -> Path:
    data = bytearray(good_legacy(path).read_bytes())
    data[512 + 148] ^= 0x01  # checksum field of the second header
    path.write_bytes(bytes(data))
    return path


def many_members(count: int) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        return write_tar(path, [file(f"f{i}") for i in range(count)])

    return build


def manifest_missing(path: Path) -> Path:
    return write_tar(path, without(legacy_members(), "manifest.json"))


def manifest_not_json(path: Path) -> Path:
    return write_tar(path, replace(legacy_members(), "manifest.json", b"[{'Config': 1}]"))


def manifest_not_list(path: Path) -> Path:
    entry = {"Config": "c.json", "RepoTags": None, "Layers": [f"{LAYER_ID}/layer.tar"]}
    return write_tar(path, legacy_members(manifest=entry))


def manifest_empty_list(path: Path) -> Path:
    return write_tar(path, legacy_members(manifest=[]))


def manifest_duplicate_key(path: Path) -> Path:
    raw = (
        b'[{"Config":"%s.json","Config":"other.json","RepoTags":null,"Layers":["%s/layer.tar"]}]'
        % (_sha256(CONFIG_BYTES).encode(), LAYER_ID.encode())
    )
    return write_tar(path, replace(legacy_members(), "manifest.json", raw))


def manifest_case_variant_key(path: Path) -> Path:
    name = f"{_sha256(CONFIG_BYTES)}.json"
    entry = {"Config": name, "config": "other.json", "Layers": [f"{LAYER_ID}/layer.tar"]}
    return write_tar(path, legacy_members(manifest=[entry]))


def manifest_repo_tags_string(path: Path) -> Path:
    name = f"{_sha256(CONFIG_BYTES)}.json"
    entry = {"Config": name, "RepoTags": "agent:1", "Layers": [f"{LAYER_ID}/layer.tar"]}
    return write_tar(path, legacy_members(manifest=[entry]))


def manifest_no_layers(path: Path) -> Path:
    entry: dict[str, Any] = {"Config": f"{_sha256(CONFIG_BYTES)}.json", "Layers": []}
    return write_tar(path, legacy_members(manifest=[entry]))


def manifest_layer_escapes(path: Path) -> Path:
    entry = {"Config": f"{_sha256(CONFIG_BYTES)}.json", "Layers": ["../layer.tar"]}
    return write_tar(path, legacy_members(manifest=[entry]))


def two_images(path: Path) -> Path:
    entry = {"Config": f"{_sha256(CONFIG_BYTES)}.json", "Layers": [f"{LAYER_ID}/layer.tar"]}
    return write_tar(path, legacy_members(manifest=[entry, entry]))


def missing_layer(path: Path) -> Path:
    return write_tar(path, without(legacy_members(), f"{LAYER_ID}/layer.tar"))


def layer_is_directory(path: Path) -> Path:
    members = without(legacy_members(), f"{LAYER_ID}/layer.tar")
    return write_tar(path, [*members, directory(f"{LAYER_ID}/layer.tar")])


def missing_config(path: Path) -> Path:
    return write_tar(path, without(legacy_members(), f"{_sha256(CONFIG_BYTES)}.json"))


def config_not_object(path: Path) -> Path:
    return write_tar(path, legacy_members(config=b"[]"))


def config_not_json(path: Path) -> Path:
    return write_tar(path, legacy_members(config=b"{not json"))


def config_too_large(path: Path) -> Path:
    return write_tar(path, legacy_members(config=_json({**CONFIG, "padding": "x" * 5000})))


def config_digest_mismatch(path: Path) -> Path:
    return write_tar(path, legacy_members(config_name=f"{'0' * 64}.json"))


def oci_config_digest_mismatch(path: Path) -> Path:
    members = oci_members()
    name = f"blobs/sha256/{_sha256(CONFIG_BYTES)}"
    return write_tar(path, replace(members, name, _json({**CONFIG, "os": "windows"})))


def oci_orphan_blob(path: Path) -> Path:
    return write_tar(path, [*oci_members(), blob(b"\x7fELF not referenced by anything")])


def oci_orphan_json_blob(path: Path) -> Path:
    return write_tar(path, [*oci_members(), blob(_json({"note": "not a legacy config"}))])


def oci_too_many_legacy_configs(path: Path) -> Path:
    second = _json({"id": "b" * 64, "os": "linux"})
    return write_tar(path, [*oci_members(), blob(second)])


def oci_manifest_of_other_image(path: Path) -> Path:
    return write_tar(path, [*oci_members(tagged=False), blob(oci_manifest(f"sha256:{'1' * 64}"))])


def oci_index_not_json(path: Path) -> Path:
    return write_tar(path, replace(oci_members(), "index.json", b"{"))


def oci_index_bad_digest(path: Path) -> Path:
    index = _json({"schemaVersion": 2, "manifests": [{"digest": "md5:abc"}]})
    return write_tar(path, replace(oci_members(), "index.json", index))


def oci_manifest_blob_mismatch(path: Path) -> Path:
    manifest = oci_manifest()
    name = f"blobs/sha256/{_sha256(manifest)}"
    return write_tar(path, replace(oci_members(), name, manifest + b" "))


def size_field_leading_nul(path: Path) -> Path:
    """Write an empty member whose size field starts with a NUL.

    Python's tarfile stops reading the field at the NUL and Go's archive/tar skips it, so any
    digits after it would give two different sizes.
    """
    data = bytearray(write_tar(path, [file("repositories"), *legacy_members()[:-1]]).read_bytes())
    data[124:136] = b"\x00" + b"0" * 10 + b"\x00"
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\x00 " % sum(data[:512])
    path.write_bytes(bytes(data))
    return path


def pax_record(key: str, value: str) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        members = legacy_members()
        members[1].info.pax_headers = {key: value}
        return write_tar(path, members)

    return build


def layer_content(data: bytes) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        return write_tar(path, replace(legacy_members(), f"{LAYER_ID}/layer.tar", data))

    return build


def repo_tag(tag: str) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        entry = {
            "Config": f"{_sha256(CONFIG_BYTES)}.json",
            "RepoTags": [tag],
            "Layers": [f"{LAYER_ID}/layer.tar"],
        }
        return write_tar(path, legacy_members(manifest=[entry]))

    return build


SMALL_METADATA = TarballLimits(max_metadata_size=2000)


@pytest.mark.parametrize(
    ("build", "limits", "reason"),
    [
        pytest.param(parent_component, LIMITS, FailureReason.UNSAFE_MEMBER_NAME, id="dotdot"),
        pytest.param(
            parent_component_inside, LIMITS, FailureReason.UNSAFE_MEMBER_NAME, id="inner-dotdot"
        ),
        pytest.param(absolute_name, LIMITS, FailureReason.UNSAFE_MEMBER_NAME, id="absolute"),
        pytest.param(empty_component, LIMITS, FailureReason.UNSAFE_MEMBER_NAME, id="double-slash"),
        pytest.param(backslash_name, LIMITS, FailureReason.UNSAFE_MEMBER_NAME, id="backslash"),
        pytest.param(
            control_character_name, LIMITS, FailureReason.UNSAFE_MEMBER_NAME, id="newline"
        ),
        pytest.param(root_as_file, LIMITS, FailureReason.UNSAFE_MEMBER_NAME, id="root-as-file"),
        pytest.param(symlink, LIMITS, FailureReason.LINK_MEMBER, id="symlink"),
        pytest.param(hard_link, LIMITS, FailureReason.LINK_MEMBER, id="hard-link"),
        pytest.param(character_device, LIMITS, FailureReason.SPECIAL_MEMBER, id="char-device"),
        pytest.param(block_device, LIMITS, FailureReason.SPECIAL_MEMBER, id="block-device"),
        pytest.param(fifo, LIMITS, FailureReason.SPECIAL_MEMBER, id="fifo"),
        pytest.param(contiguous_file, LIMITS, FailureReason.SPECIAL_MEMBER, id="contiguous"),
        pytest.param(pax_global_header, LIMITS, FailureReason.SPECIAL_MEMBER, id="pax-global"),
        pytest.param(unexpected_file, LIMITS, FailureReason.UNEXPECTED_MEMBER, id="extra-file"),
        pytest.param(
            unexpected_directory, LIMITS, FailureReason.UNEXPECTED_MEMBER, id="extra-directory"
        ),
        pytest.param(
            unexpected_layer_sidecar, LIMITS, FailureReason.UNEXPECTED_MEMBER, id="extra-sidecar"
        ),
        pytest.param(duplicate_member, LIMITS, FailureReason.DUPLICATE_MEMBER, id="duplicate"),
        pytest.param(
            duplicate_after_normalizing, LIMITS, FailureReason.DUPLICATE_MEMBER, id="dup-dot-slash"
        ),
        pytest.param(gzip_compressed, LIMITS, FailureReason.NOT_A_TAR, id="gzip"),
        pytest.param(bzip2_compressed, LIMITS, FailureReason.NOT_A_TAR, id="bzip2"),
        pytest.param(xz_compressed, LIMITS, FailureReason.NOT_A_TAR, id="xz"),
        pytest.param(zstd_magic, LIMITS, FailureReason.NOT_A_TAR, id="zstd"),
        pytest.param(html_page, LIMITS, FailureReason.NOT_A_TAR, id="html"),
        pytest.param(empty_file, LIMITS, FailureReason.NOT_A_TAR, id="empty-file"),
        pytest.param(gnu_headers, LIMITS, FailureReason.NOT_A_TAR, id="gnu-headers"),
        pytest.param(
            gnu_long_name_in_ustar_header, LIMITS, FailureReason.NOT_A_TAR, id="gnu-long-name"
        ),
        pytest.param(data_after_end, LIMITS, FailureReason.NOT_A_TAR, id="data-after-end"),
        pytest.param(corrupt_second_header, LIMITS, FailureReason.NOT_A_TAR, id="bad-checksum"),
        pytest.param(size_field_leading_nul, LIMITS, FailureReason.NOT_A_TAR, id="size-nul-first"),
        pytest.param(
            pax_record("GNU.sparse.name", "manifest.json"),
            LIMITS,
            FailureReason.NOT_A_TAR,
            id="pax-sparse-name",
        ),
        pytest.param(
            pax_record("GNU.sparse.size", "1"), LIMITS, FailureReason.NOT_A_TAR, id="pax-sparse"
        ),
        pytest.param(
            pax_record("hdrcharset", "BINARY"), LIMITS, FailureReason.NOT_A_TAR, id="pax-charset"
        ),
        pytest.param(
            layer_content(gzip.compress(LAYER)), LIMITS, FailureReason.NOT_A_TAR, id="layer-gzip"
        ),
        pytest.param(
            layer_content(bz2.compress(LAYER)), LIMITS, FailureReason.NOT_A_TAR, id="layer-bzip2"
        ),
        pytest.param(
            layer_content(lzma.compress(LAYER)), LIMITS, FailureReason.NOT_A_TAR, id="layer-xz"
        ),
        pytest.param(
            layer_content(b"\x28\xb5\x2f\xfd" + LAYER),
            LIMITS,
            FailureReason.NOT_A_TAR,
            id="layer-zstd",
        ),
        pytest.param(
            layer_content(b"\x7fELF" + bytes(1020)),
            LIMITS,
            FailureReason.NOT_A_TAR,
            id="layer-not-tar",
        ),
        pytest.param(
            many_members(20_001),
            TarballLimits(max_members=20_000),
            FailureReason.TOO_MANY_MEMBERS,
            id="too-many-members",
        ),
        pytest.param(
            good_legacy,
            TarballLimits(max_total_size=1024),
            FailureReason.TARBALL_TOO_LARGE,
            id="total-size",
        ),
        pytest.param(manifest_missing, LIMITS, FailureReason.MANIFEST_MISSING, id="no-manifest"),
        pytest.param(
            manifest_not_json, LIMITS, FailureReason.MANIFEST_INVALID, id="manifest-not-json"
        ),
        pytest.param(
            manifest_not_list, LIMITS, FailureReason.MANIFEST_INVALID, id="manifest-not-list"
        ),
        pytest.param(
            manifest_empty_list, LIMITS, FailureReason.MANIFEST_INVALID, id="manifest-empty"
        ),
        pytest.param(
            manifest_duplicate_key, LIMITS, FailureReason.MANIFEST_INVALID, id="manifest-dup-key"
        ),
        pytest.param(
            manifest_case_variant_key, LIMITS, FailureReason.MANIFEST_INVALID, id="manifest-case"
        ),
        pytest.param(
            manifest_repo_tags_string, LIMITS, FailureReason.MANIFEST_INVALID, id="repo-tags-str"
        ),
        pytest.param(manifest_no_layers, LIMITS, FailureReason.MANIFEST_INVALID, id="no-layers"),
        *[
            pytest.param(repo_tag(tag), LIMITS, FailureReason.MANIFEST_INVALID, id=case)
            for tag, case in [
                ("agent", "repo-tag-no-tag"),
                (f"agent@sha256:{'0' * 64}", "repo-tag-digest"),
                ("Agent:1", "repo-tag-upper-case"),
                ("agent:-1", "repo-tag-dash-first"),
                ("agent:", "repo-tag-empty-tag"),
                (f"agent:{'x' * 129}", "repo-tag-tag-too-long"),
                (f"{'a' * 256}:1", "repo-tag-name-too-long"),
                ("registry.test/../agent:1", "repo-tag-dot-dot"),
            ]
        ],
        pytest.param(
            manifest_layer_escapes, LIMITS, FailureReason.MANIFEST_INVALID, id="layer-escapes"
        ),
        pytest.param(
            good_legacy,
            TarballLimits(max_metadata_size=100),
            FailureReason.MANIFEST_INVALID,
            id="manifest-too-large",
        ),
        pytest.param(two_images, LIMITS, FailureReason.MULTIPLE_IMAGES, id="two-images"),
        pytest.param(missing_layer, LIMITS, FailureReason.MISSING_LAYER, id="missing-layer"),
        pytest.param(layer_is_directory, LIMITS, FailureReason.MISSING_LAYER, id="layer-dir"),
        pytest.param(missing_config, LIMITS, FailureReason.MISSING_CONFIG, id="missing-config"),
        pytest.param(config_not_object, LIMITS, FailureReason.CONFIG_INVALID, id="config-list"),
        pytest.param(config_not_json, LIMITS, FailureReason.CONFIG_INVALID, id="config-not-json"),
        pytest.param(
            config_too_large, SMALL_METADATA, FailureReason.CONFIG_INVALID, id="config-too-large"
        ),
        pytest.param(
            config_digest_mismatch,
            LIMITS,
            FailureReason.CONFIG_DIGEST_MISMATCH,
            id="config-digest",
        ),
        pytest.param(
            oci_config_digest_mismatch,
            LIMITS,
            FailureReason.CONFIG_DIGEST_MISMATCH,
            id="oci-config-digest",
        ),
        pytest.param(oci_orphan_blob, LIMITS, FailureReason.UNEXPECTED_MEMBER, id="oci-orphan"),
        pytest.param(
            oci_orphan_json_blob, LIMITS, FailureReason.UNEXPECTED_MEMBER, id="oci-orphan-json"
        ),
        pytest.param(
            oci_too_many_legacy_configs,
            LIMITS,
            FailureReason.UNEXPECTED_MEMBER,
            id="oci-extra-legacy-config",
        ),
        pytest.param(
            oci_manifest_of_other_image,
            LIMITS,
            FailureReason.UNEXPECTED_MEMBER,
            id="oci-other-manifest",
        ),
        pytest.param(
            oci_index_not_json, LIMITS, FailureReason.MANIFEST_INVALID, id="oci-index-not-json"
        ),
        pytest.param(
            oci_index_bad_digest, LIMITS, FailureReason.MANIFEST_INVALID, id="oci-index-digest"
        ),
        pytest.param(
            oci_manifest_blob_mismatch,
            LIMITS,
            FailureReason.MANIFEST_INVALID,
            id="oci-manifest-blob-digest",
        ),
    ],
)
def test_rejects_with_reason(
    build: Callable[[Path], Path], limits: TarballLimits, reason: FailureReason, tmp_path: Path
) -> None:
    path = build(tmp_path / "image.tar")

    with pytest.raises(ImageRejected) as caught:
        inspect_image_tarball(path, limits=limits)

    assert caught.value.reason == reason


def test_member_limit_stops_reading_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = many_members(25_000)(tmp_path / "image.tar")
    headers_read = 0
    read_header = tarfile.TarInfo.fromtarfile.__func__  # type: ignore[attr-defined]

    def counting(cls: type[tarfile.TarInfo], archive: tarfile.TarFile) -> tarfile.TarInfo:
        nonlocal headers_read
        headers_read += 1
        return read_header(cls, archive)  # type: ignore[no-any-return]

    monkeypatch.setattr(tarfile.TarInfo, "fromtarfile", classmethod(counting))

    with pytest.raises(ImageRejected) as caught:
        inspect_image_tarball(path, limits=TarballLimits(max_members=20_000))

    assert caught.value.reason == FailureReason.TOO_MANY_MEMBERS
    assert headers_read == 20_001


def test_rejection_message_names_member(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected) as caught:
        inspect_image_tarball(parent_component(tmp_path / "image.tar"), limits=LIMITS)

    assert "'../escape'" in caught.value.message


@pytest.mark.parametrize(
    "tag",
    [
        "agent:1",
        "docker.io/library/agent:latest",
        "localhost:5000/team/agent:v1.2-rc_3",
        "registry.test/a/b_c__d-e.f:1",
        f"{'a' * 255}:1",
    ],
)
def test_accepts_repo_tag(tag: str, tmp_path: Path) -> None:
    image = inspect_image_tarball(repo_tag(tag)(tmp_path / "image.tar"), limits=LIMITS)

    assert image.repo_tags == (tag,)
