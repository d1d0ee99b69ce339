"""Structure checks on an image tarball, run before `docker load`.

The supervisor downloads a tarball and checks its digest, then calls `inspect_image_tarball`,
and only a tarball that passes goes on to the image config checks and `docker load`. The
checks read tar headers, including the headers inside each layer (layer_entries.py), and a
few small JSON members into memory and extract nothing. A hostile archive is therefore rejected
before it can write outside the daemon's temporary folder, plant links or device files, or
hide a second image. It also cannot fill the disk through its member sizes, a compressed
layer or a sparse file inside a layer. The checks also return the config digest, which is the
image ID that Docker must report after the load.

Two layouts are accepted: the legacy layout of `docker save` in Docker 20.10 (checked against
a real save) and the OCI layout that Docker 25 and later write (moby
image/tarexport/save.go). Every member must be accounted for by manifest.json or index.json.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.layer_entries import check_layer_entries
from services.supervisor.tar_members import (
    check_layer_start,
    load_json,
    normalize_member_name,
    read_members,
    read_small_member,
    reject_compressed,
)

_LEGACY_CONFIG_NAME = re.compile(r"([0-9a-f]{64})\.json")
_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_HEX_ID = re.compile(r"[0-9a-f]{64}")
# Keys of Docker's manifestItem. Go matches JSON keys case-insensitively, so an unknown key
# such as "config" could override "Config" in the daemon while Python reads the other one.
_MANIFEST_KEYS = frozenset({"Config", "RepoTags", "Layers", "Parent", "LayerSources"})
# A RepoTags entry as Docker's reference parser (distribution/reference, vendored by Docker
# 20.10) accepts it for a tag: an optional registry host and port, lower-case path components
# and a tag. `docker load` creates the image before it parses RepoTags, so an entry it rejects,
# such as a name without a tag, fails the load and leaves the image behind.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-*)[a-z0-9]+)*"
_REPO_TAG = re.compile(
    rf"(?P<name>(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?/)?"
    rf"{_PATH_PART}(?:/{_PATH_PART})*):[\w][\w.-]{{0,127}}",
    re.ASCII,
)
_MAX_REPOSITORY_NAME = 255
_METADATA_FILES = frozenset({"manifest.json", "repositories", "index.json", "oci-layout"})

_Members = dict[str, tarfile.TarInfo]


@dataclass(frozen=True, kw_only=True)
class TarballLimits:
    """Limits on an image tarball. A tarball over any of them is rejected."""

    max_members: int = 10_000
    max_total_size: int = 4 * 1024**3  # bytes, sum of member sizes
    # bytes, for manifest.json, index.json, the config and OCI JSON blobs read into memory
    max_metadata_size: int = 4 * 1024**2
    # entries in one layer's tar archive, PAX and GNU long-name headers not counted
    max_layer_entries: int = 1_000_000


@dataclass(frozen=True, kw_only=True)
class ImageTarball:
    """The image that a checked tarball contains."""

    config_digest: str  # "sha256:<hex>" of the config blob, the image ID Docker will report
    repo_tags: tuple[str, ...]
    config: dict[str, Any]  # the parsed image config JSON
    layer_count: int


@dataclass(frozen=True, kw_only=True)
class _ManifestEntry:
    config: str
    layers: tuple[str, ...]
    repo_tags: tuple[str, ...]


def inspect_image_tarball(path: Path, *, limits: TarballLimits) -> ImageTarball:
    """Check the structure of a `docker save` tarball without extracting it.

    Reads every tar header, then manifest.json, index.json, the image config and small OCI
    blobs into memory, each bounded by `limits.max_metadata_size`. Of each layer the first
    block is read, to reject compressed layers, and then its tar headers, seeking over file
    data. Layers are not hashed, because `docker load` checks them against the config's diff
    IDs. Raises ImageRejected with the reason code of the first failed check, and OSError if
    the file cannot be read.
    """
    reject_compressed(path)

    with path.open("rb") as file:
        try:
            with tarfile.open(fileobj=file, mode="r:") as archive:
                members = read_members(
                    archive,
                    file,
                    max_members=limits.max_members,
                    max_total_size=limits.max_total_size,
                )
                manifest = _read_manifest(archive, members, limits)
                config_bytes = _read_config(archive, members, manifest.config, limits)
                _check_layers(archive, file, members, manifest.layers, limits)
                allowed = _allowed_files(manifest) | _index_blobs(archive, members, limits)
                config_digest = f"sha256:{hashlib.sha256(config_bytes).hexdigest()}"
                _reject_unexpected(
                    archive,
                    members,
                    allowed=allowed,
                    layer_count=len(manifest.layers),
                    config_digest=config_digest,
                    limits=limits,
                )
        except tarfile.TarError as exc:
            raise ImageRejected(FailureReason.NOT_A_TAR, f"invalid tar archive: {exc}") from exc

    config = load_json(config_bytes, reason=FailureReason.CONFIG_INVALID, name=manifest.config)
    if not isinstance(config, dict):
        raise ImageRejected(
            FailureReason.CONFIG_INVALID,
            f"config {manifest.config!r} is a JSON {type(config).__name__}, expected an object",
        )
    return ImageTarball(
        config_digest=config_digest,
        repo_tags=manifest.repo_tags,
        config=config,
        layer_count=len(manifest.layers),
    )


def _read_manifest(
    archive: tarfile.TarFile, members: _Members, limits: TarballLimits
) -> _ManifestEntry:
    member = members.get("manifest.json")
    if member is None:
        raise ImageRejected(FailureReason.MANIFEST_MISSING, "tarball has no manifest.json")
    reason = FailureReason.MANIFEST_INVALID
    data = read_small_member(archive, member, max_size=limits.max_metadata_size, reason=reason)
    return _parse_manifest(load_json(data, reason=reason, name="manifest.json"))


def _parse_manifest(manifest: Any) -> _ManifestEntry:
    def invalid(problem: str) -> ImageRejected:
        return ImageRejected(FailureReason.MANIFEST_INVALID, f"manifest.json {problem}")

    if not isinstance(manifest, list) or not manifest:
        raise invalid(f"is {manifest!r:.80}, expected a list with one image")
    if len(manifest) > 1:
        raise ImageRejected(
            FailureReason.MULTIPLE_IMAGES, f"manifest.json lists {len(manifest)} images, expected 1"
        )
    entry = manifest[0]
    if not isinstance(entry, dict):
        raise invalid(f"entry is {entry!r:.80}, expected an object")
    unknown = sorted(set(entry) - _MANIFEST_KEYS)
    if unknown:
        raise invalid(f"has unknown keys {unknown!r}, expected only {sorted(_MANIFEST_KEYS)!r}")

    config = entry.get("Config")
    layers = entry.get("Layers")
    repo_tags = entry.get("RepoTags")
    sources = entry.get("LayerSources", {})
    if not isinstance(config, str):
        raise invalid(f"Config is {config!r:.80}, expected a path")
    if not _is_string_list(layers) or not layers:
        raise invalid(f"Layers is {layers!r:.80}, expected a non-empty list of paths")
    if repo_tags is not None and not _is_string_list(repo_tags):
        raise invalid(f"RepoTags is {repo_tags!r:.80}, expected null or a list of strings")
    _check_repo_tags(repo_tags or [])
    if not isinstance(entry.get("Parent", ""), str):
        raise invalid(f"Parent is {entry['Parent']!r:.80}, expected an image ID")
    if not isinstance(sources, dict) or not all(isinstance(s, dict) for s in sources.values()):
        raise invalid(f"LayerSources is {sources!r:.80}, expected an object of descriptors")

    paths = []
    for raw in [config, *layers]:
        try:
            paths.append(normalize_member_name(raw))
        except ValueError as exc:
            raise invalid(f"names an unsafe path: {exc}") from None
    if "" in paths:
        raise invalid("names the archive root as the config or a layer")
    return _ManifestEntry(
        config=paths[0], layers=tuple(paths[1:]), repo_tags=tuple(repo_tags or ())
    )


def _check_repo_tags(repo_tags: list[str]) -> None:
    for tag in repo_tags:
        match = _REPO_TAG.fullmatch(tag)
        if match is None or len(match["name"]) > _MAX_REPOSITORY_NAME:
            raise ImageRejected(
                FailureReason.MANIFEST_INVALID,
                f"manifest.json RepoTags entry {tag!r:.300} is not a name:tag reference that "
                "docker load accepts; save the image by ID (docker save <image ID>) or by "
                "name:tag",
            )


def _read_config(
    archive: tarfile.TarFile, members: _Members, name: str, limits: TarballLimits
) -> bytes:
    member = members.get(name)
    if member is None:
        raise ImageRejected(FailureReason.MISSING_CONFIG, f"config {name!r} is not in the tarball")
    data = read_small_member(
        archive, member, max_size=limits.max_metadata_size, reason=FailureReason.CONFIG_INVALID
    )

    named = _LEGACY_CONFIG_NAME.fullmatch(name) or _BLOB_NAME.fullmatch(name)
    actual = hashlib.sha256(data).hexdigest()
    if named and named.group(1) != actual:
        raise ImageRejected(
            FailureReason.CONFIG_DIGEST_MISMATCH,
            f"config {name!r} has digest sha256:{actual}, expected the digest in its name",
        )
    return data


def _check_layers(
    archive: tarfile.TarFile,
    file: BinaryIO,
    members: _Members,
    layers: tuple[str, ...],
    limits: TarballLimits,
) -> None:
    """Check the start and every header of each layer, in place in the open tarball.

    `docker save` layers are plain tar, so their entries cannot hold more file data than
    the tarball. So the data sizes of all layers' entries must add up to at most
    `limits.max_total_size`, and this also counts a layer that manifest.json lists twice.
    """
    data_size = 0
    for layer in layers:
        member = _require_layer(members, layer)
        check_layer_start(archive, member, layer)
        entries = check_layer_entries(
            file,
            layer=layer,
            offset=member.offset_data,
            size=member.size,
            max_entries=limits.max_layer_entries,
            max_data_size=limits.max_total_size,
            data_before=data_size,
        )
        data_size += entries.data_size


def _require_layer(members: _Members, name: str) -> tarfile.TarInfo:
    member = members.get(name)
    if member is None:
        raise ImageRejected(FailureReason.MISSING_LAYER, f"layer {name!r} is not in the tarball")
    if not member.isfile():
        raise ImageRejected(
            FailureReason.MISSING_LAYER, f"layer {name!r} is a directory, expected a tar file"
        )
    return member


def _allowed_files(manifest: _ManifestEntry) -> set[str]:
    """Return the file names that manifest.json accounts for, with legacy layer sidecars."""
    allowed = set(_METADATA_FILES) | {manifest.config, *manifest.layers}
    for layer in manifest.layers:
        folder, _, base = layer.rpartition("/")
        if folder and base == "layer.tar":
            allowed |= {f"{folder}/VERSION", f"{folder}/json"}
    return allowed


def _index_blobs(archive: tarfile.TarFile, members: _Members, limits: TarballLimits) -> set[str]:
    """Return the blob names reachable from index.json, reading each index and manifest blob.

    A reachable blob may be absent, because an export can leave out the manifests of other
    platforms. `docker load` in Docker 20.10 reads only manifest.json.
    """
    member = members.get("index.json")
    if member is None:
        return set()
    reason = FailureReason.MANIFEST_INVALID
    data = read_small_member(archive, member, max_size=limits.max_metadata_size, reason=reason)
    index = load_json(data, reason=reason, name="index.json")

    reachable: set[str] = set()
    pending, _ = _referenced_digests(index)
    while pending:
        name = f"blobs/sha256/{pending.pop()}"
        if name in reachable:
            continue
        reachable.add(name)
        blob = members.get(name)
        if blob is None:
            continue
        manifests, contents = _referenced_digests(_read_blob(archive, name, blob, limits, reason))
        pending += manifests
        reachable |= {f"blobs/sha256/{digest}" for digest in contents}
    return reachable


def _referenced_digests(document: Any) -> tuple[list[str], list[str]]:
    """Return the hex digests of the manifests and of the config and layers a document names.

    An OCI image index names only manifests, and an image manifest only a config and layers.
    """
    is_index = isinstance(document, dict) and "manifests" in document
    is_manifest = isinstance(document, dict) and "config" in document
    if is_index == is_manifest:
        raise ImageRejected(
            FailureReason.MANIFEST_INVALID,
            f"OCI document {document!r:.80} is neither an image index nor an image manifest",
        )
    if is_index:
        return _descriptor_digests(document["manifests"]), []
    layers = _descriptor_digests(document.get("layers", []))
    return [], _descriptor_digests([document["config"]]) + layers


def _descriptor_digests(descriptors: Any) -> list[str]:
    if not isinstance(descriptors, list):
        raise ImageRejected(
            FailureReason.MANIFEST_INVALID, f"descriptors {descriptors!r:.80} are not a list"
        )
    digests = []
    for descriptor in descriptors:
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
        if match is None:
            raise ImageRejected(
                FailureReason.MANIFEST_INVALID,
                f"descriptor {descriptor!r:.80} has no digest of the form sha256:<64 hex>",
            )
        digests.append(match.group(1))
    return digests


def _reject_unexpected(
    archive: tarfile.TarFile,
    members: _Members,
    *,
    allowed: set[str],
    layer_count: int,
    config_digest: str,
    limits: TarballLimits,
) -> None:
    """Reject every member that neither manifest.json nor index.json accounts for.

    Docker 25 and later also write one legacy config blob per layer, and Docker 25.0 the OCI
    manifest of an untagged image, without a reference from either file. Such blobs are
    accepted when they are small, match their digest and have that shape.
    """
    folders: set[str] = set()
    for allowed_name in allowed:
        folder = allowed_name
        while folder := folder.rpartition("/")[0]:
            folders.add(folder)
    legacy_configs = 0

    for name, member in members.items():
        if name in (allowed if member.isfile() else folders):
            continue
        blob = _read_side_blob(archive, name, member, limits)
        if _is_legacy_layer_config(blob) and legacy_configs < layer_count:
            legacy_configs += 1
            continue
        if _is_manifest_of(blob, config_digest):
            continue
        raise ImageRejected(
            FailureReason.UNEXPECTED_MEMBER,
            f"member {member.name!r} is not named by manifest.json or reachable from index.json",
        )


def _read_side_blob(
    archive: tarfile.TarFile, name: str, member: tarfile.TarInfo, limits: TarballLimits
) -> Any:
    """Return the parsed JSON of an unreferenced blob, or None if it cannot be a side blob."""
    if not _BLOB_NAME.fullmatch(name) or not member.isfile():
        return None
    if member.size > limits.max_metadata_size:
        return None
    try:
        return _read_blob(archive, name, member, limits, FailureReason.UNEXPECTED_MEMBER)
    except ImageRejected:
        return None


def _is_legacy_layer_config(blob: Any) -> bool:
    layer_id = blob.get("id") if isinstance(blob, dict) else None
    return isinstance(layer_id, str) and _HEX_ID.fullmatch(layer_id) is not None


def _is_manifest_of(blob: Any, config_digest: str) -> bool:
    config = blob.get("config") if isinstance(blob, dict) else None
    return isinstance(config, dict) and config.get("digest") == config_digest


def _read_blob(
    archive: tarfile.TarFile,
    name: str,
    member: tarfile.TarInfo,
    limits: TarballLimits,
    reason: FailureReason,
) -> Any:
    """Read and parse a JSON blob, checking that its content matches the digest in its name."""
    data = read_small_member(archive, member, max_size=limits.max_metadata_size, reason=reason)
    actual = hashlib.sha256(data).hexdigest()
    if name != f"blobs/sha256/{actual}":
        raise ImageRejected(
            reason, f"blob {name!r} has digest sha256:{actual}, expected the digest in its name"
        )
    return load_json(data, reason=reason, name=name)


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
