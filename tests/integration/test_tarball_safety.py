"""Hostile image tarballs sent through the gateway to the supervisor, rejected before `docker load`.

Each tarball is crafted here, in the legacy layout that `docker save` of Docker 20.10 writes,
and served from 127.0.0.1. For every case the agent must end `failed` with the reason code,
and the supervisor must audit an `image.verification_failed` event with the same code.
`docker load` must not have run: no image that the tarball names in any reading exists
afterwards, and the supervisor logged no load of the tarball's digest. The partial download
must be gone and the tarball must not be cached. The Docker daemon is shared with other test
runs, so the tests check exact image IDs instead of the whole image list.

Layer bombs expand to at most 256 MiB, so that a regression which lets one reach `docker
load` costs the daemon's disk little before the test removes the image.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import docker
import httpx
import pytest
from docker.errors import NotFound

from tests.integration.test_bad_input import Leftovers, assert_failed, file_digest, start_agent
from tests.support.images import build_busybox_image
from tests.support.stack import FileServer, Stack

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
AUDIT_EVENT = "image.verification_failed"
AUDIT_WAIT_SECONDS = 15.0
EMPTY_LAYER = bytes(1024)  # an empty tar archive, which `docker load` accepts as a layer
LAYER_BOMB_SIZE = 256 * MIB
TARBALL_BOMB_SIZE = 1024 * MIB
MILLION = 1_000_000
# The supervisor's default --image-max-members.
MEMBER_LIMIT = 10_000

# One tarball member: its header and its content (None for links and directories).
Member = tuple[tarfile.TarInfo, bytes | None]


# ---------------------------------------------------------------------------------------------
# Crafting tarballs


def _regular(name: str, content: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = 0o644
    return info, content


def _link(name: str, kind: bytes, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass
class Image:
    """The members of a one-layer image as `docker save` writes them, before writing.

    `manifest` is the single manifest.json entry. A case may change it or the members.
    """

    members: list[Member]
    manifest: dict[str, Any]
    config_name: str

    @property
    def image_id(self) -> str:
        """The ID that `docker load` gives the image: the digest of its config."""
        return f"sha256:{self.config_name.removesuffix('.json')}"

    def tar_members(self) -> list[Member]:
        """Return every member, manifest.json last, as `docker save` orders them."""
        return [*self.members, _regular("manifest.json", _json([self.manifest]))]


def make_image(
    *,
    layer: bytes = EMPTY_LAYER,
    diff_id: str | None = None,
    repo_tags: list[str] | None = None,
    command: str = "/agent",
) -> Image:
    """Return a valid image whose config carries a random label, so its ID is new.

    `diff_id` is the digest of the uncompressed layer, which `docker load` checks. Without
    it, the digest of `layer` is used.
    """
    config = _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": [command], "Labels": {"test-nonce": uuid.uuid4().hex}},
            "rootfs": {"type": "layers", "diff_ids": [diff_id or f"sha256:{_hex(layer)}"]},
        }
    )
    layer_id = uuid.uuid4().hex * 2  # the legacy v1 layer ID, a folder name
    folder = tarfile.TarInfo(layer_id)
    folder.type = tarfile.DIRTYPE
    folder.mode = 0o755
    config_name = f"{_hex(config)}.json"
    return Image(
        members=[
            (folder, None),
            _regular(f"{layer_id}/VERSION", b"1.0"),
            _regular(f"{layer_id}/json", _json({"id": layer_id, "os": "linux"})),
            _regular(f"{layer_id}/layer.tar", layer),
            _regular(config_name, config),
        ],
        manifest={
            "Config": config_name,
            "RepoTags": repo_tags,
            "Layers": [f"{layer_id}/layer.tar"],
        },
        config_name=config_name,
    )


def write_tar(path: Path, members: list[Member]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for info, content in members:
            archive.addfile(info, io.BytesIO(content) if content is not None else None)


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(tarfile.USTAR_FORMAT)


@dataclass(frozen=True)
class ZeroFileLayer:
    """A layer tar holding one file of zeros, split around the zeros so they can be repeated.

    `head` is the file's header, `tail` the end-of-archive blocks, and `diff_id` the digest
    of the whole uncompressed layer.
    """

    head: bytes
    size: int
    tail: bytes
    diff_id: str

    def gzip_bomb(self) -> bytes:
        """Return the layer gzip-compressed, as concatenated gzip members (RFC 1952).

        The zeros are one compressed MiB repeated, so building a large bomb is cheap.
        """
        zeros = gzip.compress(bytes(MIB))
        return gzip.compress(self.head) + zeros * (self.size // MIB) + gzip.compress(self.tail)


def zero_file_layer(size: int) -> ZeroFileLayer:
    """Return a layer with one file of `size` zero bytes, a multiple of 1 MiB."""
    head = _header("zeros", size)
    tail = bytes(2 * tarfile.BLOCKSIZE)
    digest = hashlib.sha256(head)
    chunk = bytes(MIB)
    for _ in range(size // MIB):
        digest.update(chunk)
    digest.update(tail)
    return ZeroFileLayer(head=head, size=size, tail=tail, diff_id=f"sha256:{digest.hexdigest()}")


def sparse_file_layer(size: int) -> bytes:
    """Return a layer with one PAX 1.0 sparse file of `size` bytes holding one data byte.

    Go's archive/tar fills the hole with zeros, and Docker 20.10 writes them all to disk.
    """
    sparse_map = b"1\n%d\n1\n" % (size - 1)
    data = sparse_map + bytes(-len(sparse_map) % tarfile.BLOCKSIZE) + b"x"
    info = tarfile.TarInfo("GNUSparseFile.0/sparse")
    info.size = len(data)
    info.mode = 0o644
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "sparse",
        "GNU.sparse.realsize": str(size),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# One builder per hostile tarball. Each writes the tarball to `path` and returns the IDs of
# every image that `docker load` could create from it, in any reading of the archive.


@dataclass(frozen=True)
class Victim:
    """An image of this test module and its tag, which no tarball may move."""

    tag: str
    image_id: str


Builder = Callable[[Path, Victim], tuple[str, ...]]


def _raw_block(info: tarfile.TarInfo, content: bytes | None) -> bytes:
    data = content or b""
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def gzip_bomb_tarball(path: Path, victim: Victim) -> tuple[str, ...]:
    """Write a valid image tarball, gzip-compressed to about 1 MiB, that expands to 1 GiB."""
    layer = zero_file_layer(TARBALL_BOMB_SIZE)
    image = make_image(diff_id=layer.diff_id)
    layer_name = image.manifest["Layers"][0]
    layer_size = len(layer.head) + layer.size + len(layer.tail)

    before_zeros: list[bytes] = []
    after_zeros: list[bytes] = [layer.tail]
    parts = before_zeros
    for info, content in image.tar_members():
        if info.name == layer_name:
            before_zeros += [_header(layer_name, layer_size), layer.head]
            parts = after_zeros
        else:
            parts.append(_raw_block(info, content))
    after_zeros.append(bytes(2 * tarfile.BLOCKSIZE))

    zeros = gzip.compress(bytes(MIB))
    with path.open("wb") as output:
        output.write(gzip.compress(b"".join(before_zeros)))
        for _ in range(layer.size // MIB):
            output.write(zeros)
        output.write(gzip.compress(b"".join(after_zeros)))
    return (image.image_id,)


def gzip_bomb_layer(path: Path, victim: Victim) -> tuple[str, ...]:
    """Write a valid tarball whose gzip layer of about 256 KiB expands to 256 MiB."""
    layer = zero_file_layer(LAYER_BOMB_SIZE)
    image = make_image(layer=layer.gzip_bomb(), diff_id=layer.diff_id)
    write_tar(path, image.tar_members())
    return (image.image_id,)


def sparse_file_in_layer(path: Path, victim: Victim) -> tuple[str, ...]:
    """Write a valid tarball whose 10 KiB layer contains a sparse file of 256 MiB."""
    image = make_image(layer=sparse_file_layer(LAYER_BOMB_SIZE))
    write_tar(path, image.tar_members())
    return (image.image_id,)


def symlink_then_member_through_it(path: Path, victim: Victim) -> tuple[str, ...]:
    """Plant `etc-link` -> /etc, then write `etc-link/passwd` through it."""
    image = make_image()
    image.members += [
        _link("etc-link", tarfile.SYMTYPE, "/etc"),
        _regular("etc-link/passwd", b"planted::0:0::/:/bin/sh\n"),
    ]
    write_tar(path, image.tar_members())
    return (image.image_id,)


def relative_symlink_then_member(path: Path, victim: Victim) -> tuple[str, ...]:
    """Plant `up` -> ../../.., then write `up/tmp/planted` through it."""
    image = make_image()
    image.members += [
        _link("up", tarfile.SYMTYPE, "../../.."),
        _regular("up/tmp/planted", b"planted\n"),
    ]
    write_tar(path, image.tar_members())
    return (image.image_id,)


def hard_link_to_host_file(path: Path, victim: Victim) -> tuple[str, ...]:
    image = make_image()
    image.members.append(_link("shadow", tarfile.LNKTYPE, "/etc/shadow"))
    write_tar(path, image.tar_members())
    return (image.image_id,)


def manifest_change(**change: Any) -> Builder:
    """Return a builder of a valid image whose manifest entry has `change` applied."""

    def build(path: Path, victim: Victim) -> tuple[str, ...]:
        image = make_image()
        image.manifest.update(change)
        write_tar(path, image.tar_members())
        return (image.image_id,)

    build.__name__ = "manifest_" + "_".join(change)
    return build


def foreign_tag(tag_of: Callable[[Victim], str]) -> Builder:
    """Return a builder of a valid image whose RepoTags name the victim's tag."""

    def build(path: Path, victim: Victim) -> tuple[str, ...]:
        image = make_image(repo_tags=[tag_of(victim)])
        write_tar(path, image.tar_members())
        return (image.image_id,)

    return build


def _ustar_header_with_size_field(name: str, field: bytes) -> bytes:
    """Return a ustar header for `name` whose 12-byte size field is `field`, checksum fixed."""
    block = bytearray(_header(name, 0))
    block[124:136] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def foreign_tag_behind_size_field(path: Path, victim: Victim) -> tuple[str, ...]:
    """Write a tarball that Python reads as a benign image and Go as one tagged like the victim.

    The first member's size field starts with a NUL, so Python's tarfile reads size 0 and Go's
    archive/tar, which trims NULs first, reads the length of the benign members. Go skips those
    as the member's data and finds the hostile members, which Python reads as the benign
    layer's data.
    """
    hostile = make_image(repo_tags=[victim.tag])
    benign = make_image()
    hidden = b"".join(_raw_block(info, content) for info, content in hostile.tar_members())

    seen_by_python = b""
    for info, content in benign.tar_members():
        if info.name == benign.manifest["Layers"][0]:
            continue
        seen_by_python += _raw_block(info, content)
    seen_by_python += _header(benign.manifest["Layers"][0], len(hidden))
    size_field = b"\x00" + b"%010o" % len(seen_by_python) + b"\x00"

    path.write_bytes(
        _ustar_header_with_size_field("repositories", size_field)
        + seen_by_python
        + hidden
        + bytes(2 * tarfile.BLOCKSIZE)
    )
    return (benign.image_id, hostile.image_id)


def foreign_tag_behind_sparse_name(path: Path, victim: Victim) -> tuple[str, ...]:
    """Write a tarball whose manifest.json and `repositories` swap names for Python only.

    Python's tarfile renames a member to its PAX record GNU.sparse.name, and Go's archive/tar
    does so for sparse files only. The hostile config hides from Python as the layer's `json`
    sidecar in the same way, and both images share the benign image's empty layer.
    """
    benign = make_image()
    hostile = make_image(repo_tags=[victim.tag])
    layer_name = benign.manifest["Layers"][0]
    sidecar_name = layer_name.replace("/layer.tar", "/json")
    hostile.manifest["Layers"] = [layer_name]

    hostile_config = hostile.members[-1]
    hostile_config[0].pax_headers = {"GNU.sparse.name": sidecar_name}
    benign_manifest = _regular("repositories", _json([benign.manifest]))
    benign_manifest[0].pax_headers = {"GNU.sparse.name": "manifest.json"}
    hostile_manifest = _regular("manifest.json", _json([hostile.manifest]))
    hostile_manifest[0].pax_headers = {"GNU.sparse.name": "repositories"}

    members = [member for member in benign.members if member[0].name != sidecar_name]
    write_tar(path, [*members, hostile_config, benign_manifest, hostile_manifest])
    return (benign.image_id, hostile.image_id)


def repo_tag_without_tag(path: Path, victim: Victim) -> tuple[str, ...]:
    """Write a valid image whose RepoTags entry has no tag, which `docker load` rejects late."""
    image = make_image(repo_tags=[f"agent-runner-test/untagged-{uuid.uuid4().hex[:8]}"])
    write_tar(path, image.tar_members())
    return (image.image_id,)


def million_empty_members(path: Path, victim: Victim) -> tuple[str, ...]:
    """Write a valid image followed by 1,000,000 empty files, 512 MB in all."""
    image = make_image()
    with path.open("wb") as output:
        for info, content in image.tar_members():
            output.write(_raw_block(info, content))
        _write_empty_members(output, count=MILLION)
        output.write(bytes(2 * tarfile.BLOCKSIZE))
    return (image.image_id,)


def _write_empty_members(output: BinaryIO, *, count: int) -> None:
    """Write `count` headers of empty files named empty-0000000, empty-0000001 and so on.

    Each header is a copy of one template with the name's digits and the checksum patched,
    so no TarInfo is built per member.
    """
    template = bytearray(_header("empty-0000000", 0))
    digits = slice(6, 13)
    template[148:156] = b" " * 8
    checksum_without_digits = sum(template) - sum(template[digits])
    batch = bytearray()
    for index in range(count):
        name = b"%07d" % index
        template[digits] = name
        template[148:156] = b"%06o\x00 " % (checksum_without_digits + sum(name))
        batch += template
        if len(batch) >= 8 * MIB:
            output.write(batch)
            batch.clear()
    output.write(batch)


# ---------------------------------------------------------------------------------------------
# Fixtures and checks


@pytest.fixture(scope="module")
def victim(docker_client: docker.DockerClient) -> Iterator[Victim]:
    """A tagged image that tarballs try to retag, removed at the end of the module."""
    tag = f"agent-runner-test/victim-{uuid.uuid4().hex[:8]}:1"
    image_id = build_busybox_image(docker_client, entrypoint=["sleep", "1"], cmd=None, tag=tag)
    yield Victim(tag=tag, image_id=image_id)
    with contextlib.suppress(NotFound):
        docker_client.images.remove(image_id, force=True)


@pytest.fixture
def served_path(served: FileServer) -> Iterator[Path]:
    """A new file name in the served folder. The file is deleted after the test."""
    path = served.directory / f"safety-{uuid.uuid4().hex}.tar"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def cleanup_images(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    """Image IDs to remove after the test, in case a regression let a tarball load."""
    image_ids: list[str] = []
    yield image_ids
    for image_id in image_ids:
        with contextlib.suppress(NotFound):
            docker_client.images.remove(image_id, force=True)


def wait_for_audit(stack: Stack, agent_id: str) -> list[dict[str, Any]]:
    """Return the agent's image.verification_failed events, waiting for the first one.

    The supervisor publishes events in the background, so they may arrive after the reply.
    """
    deadline = time.monotonic() + AUDIT_WAIT_SECONDS
    while True:
        events = [e for e in stack.audit_events(agent_id) if e["type"] == AUDIT_EVENT]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def assert_rejected_before_load(
    *,
    stack: Stack,
    leftovers: Leftovers,
    agent: dict[str, Any],
    reason: str,
    digest: str,
    image_ids: tuple[str, ...],
) -> None:
    """Assert the failure, its audit event, that nothing was loaded and nothing was left."""
    assert_failed(agent, reason)

    events = wait_for_audit(stack, agent["agent_id"])
    assert [event["reason_code"] for event in events] == [reason], events
    assert events[0]["outcome"] == "denied", events
    assert events[0]["details"]["image_digest"] == digest, events

    leftovers.assert_none(agent_id=agent["agent_id"], digests=(digest,), image_ids=image_ids)
    loads = [
        line
        for line in stack.log_text("supervisor").splitlines()
        if "loaded image" in line and digest in line
    ]
    assert loads == []


# ---------------------------------------------------------------------------------------------
# Cases


HOSTILE_TARBALLS = [
    pytest.param(gzip_bomb_tarball, "not_a_tar", id="gzip-bomb-tarball"),
    pytest.param(gzip_bomb_layer, "not_a_tar", id="gzip-bomb-layer"),
    pytest.param(sparse_file_in_layer, "special_member", id="sparse-file-in-layer"),
    pytest.param(symlink_then_member_through_it, "link_member", id="symlink-then-member"),
    pytest.param(relative_symlink_then_member, "link_member", id="relative-symlink"),
    pytest.param(hard_link_to_host_file, "link_member", id="hard-link-etc-shadow"),
    pytest.param(
        manifest_change(Layers=["../outside/layer.tar"]), "manifest_invalid", id="layer-dotdot"
    ),
    pytest.param(manifest_change(Layers=["/etc/passwd"]), "manifest_invalid", id="layer-absolute"),
    pytest.param(manifest_change(Config="../config.json"), "manifest_invalid", id="config-dotdot"),
    pytest.param(manifest_change(Config="/etc/passwd"), "manifest_invalid", id="config-absolute"),
    pytest.param(
        manifest_change(Layers=[f"{'0' * 64}/layer.tar"]), "missing_layer", id="layer-missing"
    ),
    pytest.param(manifest_change(Config=f"{'0' * 64}.json"), "missing_config", id="config-missing"),
    pytest.param(foreign_tag(lambda v: v.tag), "retag_existing_image", id="foreign-tag"),
    pytest.param(
        foreign_tag(lambda v: f"docker.io/{v.tag}"),
        "retag_existing_image",
        id="foreign-tag-with-registry",
    ),
    pytest.param(foreign_tag_behind_size_field, "not_a_tar", id="foreign-tag-hidden-size-field"),
    pytest.param(foreign_tag_behind_sparse_name, "not_a_tar", id="foreign-tag-hidden-pax-name"),
    pytest.param(repo_tag_without_tag, "manifest_invalid", id="repo-tag-without-tag"),
]


@pytest.mark.parametrize(("build", "reason"), HOSTILE_TARBALLS)
def test_hostile_tarball_rejected_before_load(
    build: Builder,
    reason: str,
    *,
    stack: Stack,
    api: httpx.Client,
    docker_client: docker.DockerClient,
    served: FileServer,
    served_path: Path,
    victim: Victim,
    cleanup_images: list[str],
) -> None:
    image_ids = build(served_path, victim)
    cleanup_images.extend(image_ids)
    digest = file_digest(served_path)
    leftovers = Leftovers(stack, docker_client)

    agent = start_agent(api, served.url(served_path.name), digest)

    assert_rejected_before_load(
        stack=stack,
        leftovers=leftovers,
        agent=agent,
        reason=reason,
        digest=digest,
        image_ids=image_ids,
    )
    assert docker_client.images.get(victim.tag).id == victim.image_id


def test_million_members_rejected_at_limit(
    *,
    stack: Stack,
    api: httpx.Client,
    docker_client: docker.DockerClient,
    served: FileServer,
    served_path: Path,
    victim: Victim,
    cleanup_images: list[str],
) -> None:
    began = time.monotonic()
    image_ids = million_empty_members(served_path, victim)
    built = time.monotonic()
    cleanup_images.extend(image_ids)
    digest = file_digest(served_path)
    leftovers = Leftovers(stack, docker_client)

    sent = time.monotonic()
    agent = start_agent(api, served.url(served_path.name), digest)
    answered = time.monotonic()

    assert_rejected_before_load(
        stack=stack,
        leftovers=leftovers,
        agent=agent,
        reason="too_many_members",
        digest=digest,
        image_ids=image_ids,
    )
    assert f"more than {MEMBER_LIMIT} members" in agent["failure_message"]
    # Download and digest of 512 MB dominate; the header scan stops after 10,001 headers.
    assert answered - sent < 60
    print(
        f"\n1,000,000 members ({served_path.stat().st_size} bytes): built in "
        f"{built - began:.1f} s, rejected {answered - sent:.2f} s after the request"
    )
