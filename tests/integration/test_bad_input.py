"""Bad input to the gateway and the supervisor, sent as a client would send it.

Each case must get either a 4xx JSON error or an agent that ends `failed` with a reason
code, and must leave nothing behind: no container, no loaded image, no partial download and
no cached tarball. The Docker daemon is shared with other test runs that build images at
the same time, so a test checks the exact image IDs that its tarball could have produced
instead of comparing the whole image list before and after.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import json
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from docker.errors import ImageNotFound, NotFound

from services.api.errors import UNAUTHORIZED_MESSAGE
from tests.integration.conftest import Tarball, make_tarball, trusted_sources
from tests.support.images import (
    build_busybox_image,
    build_echo_agent_image,
    save_image_tarball,
)
from tests.support.signing import make_ecdsa_key, write_public_key
from tests.support.stack import HOST_LABEL, VENV_BIN, FileServer, Stack, running_stack

pytestmark = pytest.mark.integration

AGENT_LABEL = "io.agent-runner.agent-id"
KIB = 1024
MIB = 1024 * KIB
RETAG = "agent-runner-test/retag:1"
AUDIT_WAIT_SECONDS = 15.0


# ---------------------------------------------------------------------------------------------
# Checks shared by every case


class Leftovers:
    """A stack's containers and cached tarballs before a request, to check what it left."""

    def __init__(self, stack: Stack, client: docker.DockerClient) -> None:
        self.stack = stack
        self.client = client
        self._containers = self._container_ids()
        self._cached = self._cached_names()

    def assert_none(
        self,
        *,
        agent_id: str | None = None,
        digests: tuple[str, ...] = (),
        image_ids: tuple[str, ...] = (),
        verified: str | None = None,
    ) -> None:
        """Assert that no container, image, partial download or cached tarball was left.

        `digests` are tarball digests that must not be cached, and `image_ids` images that
        must not exist. `verified` is the digest of a tarball that passed every image check
        and so may be newly cached, for agents that failed after their image was loaded.
        """
        assert self._container_ids() <= self._containers
        if agent_id is not None:
            labels = [f"{HOST_LABEL}={self.stack.host_id}", f"{AGENT_LABEL}={agent_id}"]
            assert self.client.containers.list(all=True, filters={"label": labels}) == []
        assert list((self.stack.workdir / "cache" / "partial").iterdir()) == []
        allowed = self._cached | ({f"{verified[7:]}.tar"} if verified else set())
        assert self._cached_names() <= allowed
        for digest in digests:
            assert not (self.stack.workdir / "cache" / "sha256" / f"{digest[7:]}.tar").exists()
        for image_id in image_ids:
            with pytest.raises(ImageNotFound):
                self.client.images.get(image_id)

    def _container_ids(self) -> frozenset[str]:
        containers = self.client.containers.list(
            all=True, filters={"label": f"{HOST_LABEL}={self.stack.host_id}"}
        )
        return frozenset(str(container.id) for container in containers)

    def _cached_names(self) -> frozenset[str]:
        return frozenset(path.name for path in (self.stack.workdir / "cache" / "sha256").iterdir())


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    """Assert the JSON error shape, status and code, and return the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "request_id"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    assert body["request_id"] == response.headers["x-request-id"]
    message: str = body["error"]["message"]
    return message


def assert_failed(agent: dict[str, Any], reason: str) -> None:
    assert agent["state"] == "failed", agent
    assert agent["failure_reason"] == reason, agent
    assert agent["failure_message"], agent
    assert agent["stop_reason"] == "failed", agent


def assert_no_agent_for(api: httpx.Client, image_url: str) -> None:
    listed = api.get("/v1/agents").json()["agents"]
    assert [agent for agent in listed if agent["image_url"] == image_url] == []


def start_agent(api: httpx.Client, url: str, digest: str, *, wait: bool = True) -> dict[str, Any]:
    response = api.post(
        "/v1/agents",
        params={"wait": str(wait).lower()},
        json={"image_url": url, "image_digest": digest},
    )
    assert response.status_code == 202, response.text
    agent: dict[str, Any] = response.json()
    return agent


def unique_url(tarball: Tarball) -> str:
    """Return the tarball's URL with a query that makes it unique to one request.

    The file server ignores the query, so the URL still serves the tarball if a request
    that must be rejected is accepted after all.
    """
    return f"{tarball.url}?case={uuid.uuid4().hex}"


def config_digest(path: Path) -> str:
    """Return the image ID that `docker load` would give the tarball at `path`."""
    with tarfile.open(path) as archive:
        manifest_file = archive.extractfile("manifest.json")
        assert manifest_file is not None
        config_name = json.load(manifest_file)[0]["Config"]
    return f"sha256:{config_name.removesuffix('.json')}"


def file_digest(path: Path) -> str:
    return f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def audit_events(stack: Stack) -> list[dict[str, Any]]:
    """Return every event in the audit stream that `stack` publishes to."""
    output = subprocess.run(
        [VENV_BIN / "agent-runner", "audit", "events", "--limit", "100000"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=stack.env(),
    ).stdout
    return [json.loads(line) for line in output.splitlines()]


# ---------------------------------------------------------------------------------------------
# Stacks, servers and agents


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, headers=stack.headers, timeout=60) as api:
        yield api


@pytest.fixture
def leftovers(stack: Stack, docker_client: docker.DockerClient) -> Leftovers:
    return Leftovers(stack, docker_client)


@pytest.fixture(scope="module")
def limit_stack(
    tmp_path_factory: pytest.TempPathFactory, served: FileServer, unsized_server: str
) -> Iterator[Stack]:
    """A stack whose supervisor accepts image tarballs of at most 1 MiB."""
    with running_stack(
        tmp_path_factory.mktemp("limit-stack"),
        supervisor_args=[
            "--image-max-size=1MiB",
            *trusted_sources(served.url(""), unsized_server),
        ],
        network="agent-runner-test2",
        subnet="172.29.1.0/24",
        bridge="ar-test1",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def production_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack in the production profile, whose gateway rejects http:// image URLs."""
    workdir = tmp_path_factory.mktemp("production-stack")
    # The production profile requires a signer; this key signs nothing the tests start.
    key = write_public_key(make_ecdsa_key(), workdir / "signing.pub")
    with running_stack(
        workdir,
        profile="production",
        api_args=["--insecure-http"],
        supervisor_args=[f"--image-signing-key={key}"],
        network="agent-runner-test3",
        subnet="172.29.2.0/24",
        bridge="ar-test2",
    ) as running:
        yield running


class _UnsizedHandler(http.server.SimpleHTTPRequestHandler):
    """Handler that serves files without Content-Length, so a body ends at connection close."""

    protocol_version = "HTTP/1.0"

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() != "content-length":
            super().send_header(keyword, value)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def unsized_server(served: FileServer) -> Iterator[str]:
    """Serve the `served` folder without Content-Length and yield its base URL."""
    handler = functools.partial(_UnsizedHandler, directory=str(served.directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def loaded_images(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    """Collect the IDs of images that this module's agents loaded, and remove them at the end."""
    image_ids: list[str] = []
    yield image_ids
    for image_id in image_ids:
        with contextlib.suppress(NotFound):
            docker_client.images.remove(image_id, force=True)


def expect_load(client: docker.DockerClient, loaded_images: list[str], tarball: Tarball) -> None:
    """Register the tarball's image for removal unless an earlier test loaded it already."""
    image_id = config_digest(tarball.path)
    try:
        client.images.get(image_id)
    except ImageNotFound:
        loaded_images.append(image_id)


# A minimal HTTP server for one connection, run by `nc -ll -e`. It replies 200 to GET and reads
# the body of any other request until the client closes the connection, so it never ends an
# upload itself. The echo agent does: busybox httpd 1.35 passes no chunked body to its CGI, and
# the CGI rejects bodies over 1 MiB without reading them.
SINK_SCRIPT = b"""#!/bin/sh
cr=$(printf '\\r')
read -r method target version
while read -r line; do
    case $line in "$cr" | "") break ;; esac
done
if [ "$method" = GET ]; then
    printf 'HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 5\\r\\n\\r\\nsink\\n'
    exit 0
fi
cat >/dev/null
"""


@pytest.fixture(scope="module")
def sink_agent(
    client: httpx.Client,
    docker_client: docker.DockerClient,
    served: FileServer,
    loaded_images: list[str],
) -> Iterator[dict[str, Any]]:
    """A ready agent that reads every request body to its end."""
    image_id = build_busybox_image(
        docker_client,
        entrypoint=["nc", "-ll", "-p", "80", "-e", "/sink.sh"],
        cmd=None,
        extra_files={"sink.sh": SINK_SCRIPT},
    )
    loaded_images.append(image_id)
    tarball = _save(docker_client, served, image_id, "sink.tar")
    agent = start_agent(client, tarball.url, tarball.digest)
    assert agent["state"] == "ready", agent
    yield agent
    client.delete(f"/v1/agents/{agent['agent_id']}")


# ---------------------------------------------------------------------------------------------
# Tarballs and files: one builder per failure mode


def _save(client: docker.DockerClient, served: FileServer, image_id: str, name: str) -> Tarball:
    return make_tarball(client, served, image_id, f"bad-input-{name}")


@pytest.fixture(scope="module")
def crafting_base(docker_client: docker.DockerClient, served: FileServer) -> Tarball:
    """A valid agent tarball that no test loads, so its image ID must never exist.

    It is a fresh import of the echo agent, whose image ID differs from the session's echo
    image because the import time is part of the image config.
    """
    return _save(docker_client, served, build_echo_agent_image(docker_client), "base.tar")


@pytest.fixture(scope="module")
def other_file(served: FileServer) -> Path:
    """A served file whose digest is well-formed but belongs to no tarball that a test starts."""
    path = served.directory / "bad-input-other.bin"
    path.write_bytes(uuid.uuid4().bytes * 64)
    return path


@pytest.fixture(scope="module")
def html_page(served: FileServer) -> Path:
    """An HTML page such as a download site serves in place of a file."""
    path = served.directory / "bad-input-page.html"
    path.write_text(
        "<!doctype html>\n<html><head><title>Download</title></head>\n"
        "<body><p>Your download will start shortly.</p></body></html>\n" * 10
    )
    return path


@pytest.fixture(scope="module")
def proc_workdir_tarball(docker_client: docker.DockerClient, served: FileServer) -> Tarball:
    image_id = build_busybox_image(
        docker_client, entrypoint=["sleep", "3600"], cmd=None, workdir="/proc/self"
    )
    return _save(docker_client, served, image_id, "proc-workdir.tar")


@pytest.fixture(scope="module")
def never_ready_tarball(
    docker_client: docker.DockerClient, served: FileServer, loaded_images: list[str]
) -> Tarball:
    """An agent that runs but never listens on port 80."""
    image_id = build_busybox_image(docker_client, entrypoint=["sleep", "3600"], cmd=None)
    loaded_images.append(image_id)
    return _save(docker_client, served, image_id, "never-ready.tar")


EXIT_CASES = [
    pytest.param(["true"], 0, id="true"),
    pytest.param(["sh", "-c", "exit 3"], 3, id="exit-3"),
]


@pytest.fixture
def exiting_tarball(
    request: pytest.FixtureRequest,
    docker_client: docker.DockerClient,
    served: FileServer,
    loaded_images: list[str],
) -> Tarball:
    """An agent whose entrypoint, the test's parameter, exits at once."""
    image_id = build_busybox_image(docker_client, entrypoint=request.param, cmd=None)
    loaded_images.append(image_id)
    return _save(docker_client, served, image_id, f"exits-{uuid.uuid4().hex[:8]}.tar")


@dataclass
class RetagCase:
    """A tarball saved by tag, and the different image that now carries that tag."""

    tarball: Tarball
    saved_image_id: str
    current_image_id: str


@pytest.fixture
def retag_case(docker_client: docker.DockerClient, served: FileServer) -> Iterator[RetagCase]:
    first = build_busybox_image(docker_client, entrypoint=["sleep", "3600"], cmd=None, tag=RETAG)
    path = served.directory / "bad-input-retag.tar"
    digest = save_image_tarball(docker_client, RETAG, path)
    docker_client.images.remove(first, force=True)
    second = build_busybox_image(
        docker_client,
        entrypoint=["sleep", "3600"],
        cmd=None,
        extra_files={"etc/second": b"second image\n"},
        tag=RETAG,
    )
    try:
        with tarfile.open(path) as archive:
            manifest_file = archive.extractfile("manifest.json")
            assert manifest_file is not None
            assert json.load(manifest_file)[0]["RepoTags"] == [RETAG]
        assert first != second
        tarball = Tarball(path=path, digest=digest, url=served.url(path.name))
        yield RetagCase(tarball=tarball, saved_image_id=first, current_image_id=second)
    finally:
        for image_id in (second, first):
            with contextlib.suppress(NotFound):
                docker_client.images.remove(image_id, force=True)


# A tarball's members as (header, content) pairs, and its parsed manifest.json.
Entries = list[tuple[tarfile.TarInfo, bytes | None]]
Manifest = list[dict[str, Any]]


def _regular(name: str, content: bytes = b"planted\n") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = 0o644
    return info, content


def add_parent_member(entries: Entries, manifest: Manifest) -> None:
    entries.append(_regular("../planted.txt"))


def add_absolute_member(entries: Entries, manifest: Manifest) -> None:
    entries.append(_regular("/tmp/planted.txt"))


def add_symlink_member(entries: Entries, manifest: Manifest) -> None:
    info = tarfile.TarInfo("planted-link")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/shadow"
    entries.append((info, None))


def add_hardlink_member(entries: Entries, manifest: Manifest) -> None:
    info = tarfile.TarInfo("planted-hardlink")
    info.type = tarfile.LNKTYPE
    info.linkname = "manifest.json"
    entries.append((info, None))


def add_device_member(entries: Entries, manifest: Manifest) -> None:
    info = tarfile.TarInfo("planted-mem")
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 1  # /dev/mem
    entries.append((info, None))


def name_missing_layer(entries: Entries, manifest: Manifest) -> None:
    manifest[0]["Layers"].append(f"{'0' * 64}/layer.tar")


CRAFTED_CASES = [
    pytest.param(add_parent_member, "unsafe_member_name", id="parent-dir"),
    pytest.param(add_absolute_member, "unsafe_member_name", id="absolute-path"),
    pytest.param(add_symlink_member, "link_member", id="symlink"),
    pytest.param(add_hardlink_member, "link_member", id="hardlink"),
    pytest.param(add_device_member, "special_member", id="device"),
    pytest.param(name_missing_layer, "missing_layer", id="missing-layer"),
]


@pytest.fixture
def crafted_tarball(
    request: pytest.FixtureRequest, crafting_base: Tarball, served: FileServer
) -> Tarball:
    """Copy the base tarball, changed by the builder that is the test's parameter."""
    build: Callable[[Entries, Manifest], None] = request.param
    entries: Entries = []
    manifest: Manifest = []
    with tarfile.open(crafting_base.path) as source:
        for member in source.getmembers():
            reader = source.extractfile(member) if member.isfile() else None
            content = reader.read() if reader is not None else None
            if member.name == "manifest.json" and content is not None:
                manifest = json.loads(content)
            else:
                entries.append((member, content))
    build(entries, manifest)
    entries.append(_regular("manifest.json", json.dumps(manifest).encode()))

    path = served.directory / f"bad-input-{build.__name__}.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for info, content in entries:
            archive.addfile(info, io.BytesIO(content) if content is not None else None)
    return Tarball(path=path, digest=file_digest(path), url=served.url(path.name))


# ---------------------------------------------------------------------------------------------
# Image download and checks


def test_wrong_digest_fails_mismatch(
    client: httpx.Client, leftovers: Leftovers, crafting_base: Tarball, other_file: Path
) -> None:
    claimed = file_digest(other_file)

    agent = start_agent(client, crafting_base.url, claimed)

    assert_failed(agent, "digest_mismatch")
    assert claimed in agent["failure_message"]
    leftovers.assert_none(
        agent_id=agent["agent_id"],
        digests=(claimed, crafting_base.digest),
        image_ids=(config_digest(crafting_base.path),),
    )
    events = [e for e in audit_events(leftovers.stack) if e["agent_id"] == agent["agent_id"]]
    rejected = [event for event in events if event["type"] == "image.verification_failed"]
    assert [event["reason_code"] for event in rejected] == ["digest_mismatch"], events


def test_unreachable_url_fails_download(
    client: httpx.Client, leftovers: Leftovers, crafting_base: Tarball, unreachable_url: str
) -> None:
    agent = start_agent(client, unreachable_url, crafting_base.digest)

    assert_failed(agent, "download_failed")
    leftovers.assert_none(
        agent_id=agent["agent_id"],
        digests=(crafting_base.digest,),
        image_ids=(config_digest(crafting_base.path),),
    )


@contextlib.contextmanager
def unserved_port() -> Iterator[socket.socket]:
    """Yield a listening socket that nobody accepts on, to show that nothing connected to it.

    The kernel completes the handshake of a connection to it and queues the connection, so
    a non-blocking accept() afterwards finds any that arrived.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener


def assert_not_connected(listener: socket.socket) -> None:
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()


def verification_failures(stack: Stack, agent_id: str) -> list[str]:
    """Return the reason codes of the agent's image.verification_failed events.

    Events are published in the background, so this waits up to AUDIT_WAIT_SECONDS for one.
    """
    deadline = time.monotonic() + AUDIT_WAIT_SECONDS
    while True:
        events = [event for event in audit_events(stack) if event["agent_id"] == agent_id]
        failures = [
            event["reason_code"] for event in events if event["type"] == "image.verification_failed"
        ]
        if failures or time.monotonic() > deadline:
            return failures
        time.sleep(0.2)


def test_untrusted_source_fails(
    client: httpx.Client, leftovers: Leftovers, crafting_base: Tarball
) -> None:
    with unserved_port() as listener:
        port = listener.getsockname()[1]

        agent = start_agent(client, f"http://127.0.0.1:{port}/image.tar", crafting_base.digest)

        assert_not_connected(listener)
    assert_failed(agent, "source_not_trusted")
    assert f"origin http://127.0.0.1:{port}" in agent["failure_message"]
    assert "--trusted-image-sources lists http://127.0.0.1:" in agent["failure_message"]
    assert verification_failures(leftovers.stack, agent["agent_id"]) == ["source_not_trusted"]
    leftovers.assert_none(
        agent_id=agent["agent_id"],
        digests=(crafting_base.digest,),
        image_ids=(config_digest(crafting_base.path),),
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_internal_address_fails_in_production(
    host: str,
    production_stack: Stack,
    docker_client: docker.DockerClient,
    crafting_base: Tarball,
) -> None:
    """A production supervisor without sources refuses loopback hosts before connecting."""
    leftovers = Leftovers(production_stack, docker_client)

    with (
        unserved_port() as listener,
        httpx.Client(
            base_url=production_stack.api_url, headers=production_stack.headers, timeout=60
        ) as api,
    ):
        port = listener.getsockname()[1]
        agent = start_agent(api, f"https://{host}:{port}/image.tar", crafting_base.digest)

        assert_not_connected(listener)
    assert_failed(agent, "source_address_denied")
    assert "address_loopback" in agent["failure_message"]
    failures = verification_failures(production_stack, agent["agent_id"])
    assert failures == ["source_address_denied"]
    leftovers.assert_none(agent_id=agent["agent_id"], digests=(crafting_base.digest,))


def test_html_page_fails_not_a_tar(
    client: httpx.Client, leftovers: Leftovers, served: FileServer, html_page: Path
) -> None:
    digest = file_digest(html_page)

    agent = start_agent(client, served.url(html_page.name), digest)

    assert_failed(agent, "not_a_tar")
    leftovers.assert_none(agent_id=agent["agent_id"], digests=(digest,))


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "streamed"])
def test_oversized_tarball_fails_too_large(
    sized: bool,
    limit_stack: Stack,
    docker_client: docker.DockerClient,
    crafting_base: Tarball,
    unsized_server: str,
) -> None:
    assert crafting_base.path.stat().st_size > MIB
    url = crafting_base.url if sized else f"{unsized_server}/{crafting_base.path.name}"
    leftovers = Leftovers(limit_stack, docker_client)

    with httpx.Client(base_url=limit_stack.api_url, headers=limit_stack.headers, timeout=60) as api:
        agent = start_agent(api, url, crafting_base.digest)

    assert_failed(agent, "download_too_large")
    assert str(MIB) in agent["failure_message"]
    leftovers.assert_none(
        agent_id=agent["agent_id"],
        digests=(crafting_base.digest,),
        image_ids=(config_digest(crafting_base.path),),
    )


@pytest.mark.parametrize(("crafted_tarball", "reason"), CRAFTED_CASES, indirect=["crafted_tarball"])
def test_unsafe_tarball_is_rejected(
    crafted_tarball: Tarball, reason: str, client: httpx.Client, leftovers: Leftovers
) -> None:
    agent = start_agent(client, crafted_tarball.url, crafted_tarball.digest)

    assert_failed(agent, reason)
    leftovers.assert_none(
        agent_id=agent["agent_id"],
        digests=(crafted_tarball.digest,),
        image_ids=(config_digest(crafted_tarball.path),),
    )


def test_retagging_tarball_is_rejected(
    client: httpx.Client,
    leftovers: Leftovers,
    docker_client: docker.DockerClient,
    retag_case: RetagCase,
) -> None:
    agent = start_agent(client, retag_case.tarball.url, retag_case.tarball.digest)

    assert_failed(agent, "retag_existing_image")
    assert RETAG in agent["failure_message"]
    assert docker_client.images.get(RETAG).id == retag_case.current_image_id
    leftovers.assert_none(
        agent_id=agent["agent_id"],
        digests=(retag_case.tarball.digest,),
        image_ids=(retag_case.saved_image_id,),
    )


def test_proc_workdir_is_rejected(
    client: httpx.Client, leftovers: Leftovers, proc_workdir_tarball: Tarball
) -> None:
    agent = start_agent(client, proc_workdir_tarball.url, proc_workdir_tarball.digest)

    assert_failed(agent, "workdir_forbidden")
    assert "/proc/self" in agent["failure_message"]
    leftovers.assert_none(
        agent_id=agent["agent_id"],
        digests=(proc_workdir_tarball.digest,),
        image_ids=(config_digest(proc_workdir_tarball.path),),
    )


# ---------------------------------------------------------------------------------------------
# Agents that do not become ready


def test_agent_never_ready_times_out(
    client: httpx.Client,
    leftovers: Leftovers,
    docker_client: docker.DockerClient,
    never_ready_tarball: Tarball,
) -> None:
    agent = start_agent(client, never_ready_tarball.url, never_ready_tarball.digest)

    assert_failed(agent, "ready_timeout")
    assert "10 s" in agent["failure_message"]  # the session stack's --agent-start-timeout
    assert agent["container_id"]
    with pytest.raises(NotFound):
        docker_client.containers.get(agent["container_id"])
    leftovers.assert_none(agent_id=agent["agent_id"], verified=never_ready_tarball.digest)


@pytest.mark.parametrize(("exiting_tarball", "exit_code"), EXIT_CASES, indirect=["exiting_tarball"])
def test_agent_exiting_early_fails(
    exiting_tarball: Tarball,
    exit_code: int,
    client: httpx.Client,
    leftovers: Leftovers,
    docker_client: docker.DockerClient,
) -> None:
    agent = start_agent(client, exiting_tarball.url, exiting_tarball.digest)

    assert_failed(agent, "exited_before_ready")
    assert f"exited with code {exit_code} " in agent["failure_message"]
    assert agent["container_id"]
    with pytest.raises(NotFound):
        docker_client.containers.get(agent["container_id"])
    leftovers.assert_none(agent_id=agent["agent_id"], verified=exiting_tarball.digest)


# ---------------------------------------------------------------------------------------------
# Request validation


INVALID_BODIES = [
    pytest.param({"image_digest": "sha256:xyz"}, "image_digest", id="digest-not-hex"),
    pytest.param({"image_digest": f"md5:{'a' * 32}"}, "image_digest", id="digest-md5"),
    pytest.param({"image_digest": f"sha256:{'A' * 64}"}, "image_digest", id="digest-upper-case"),
    pytest.param({"image_digest": None}, "image_digest", id="digest-missing"),
    pytest.param({"privileged": True}, "privileged", id="unknown-field"),
    pytest.param({"lifetime_seconds": 3601}, "3601", id="lifetime-over-max"),
    pytest.param({"lifetime_seconds": 0}, "lifetime_seconds", id="lifetime-zero"),
    pytest.param(
        {"allowed_domains": ["ok.test", "Example.test"]},
        "use 'example.test'",
        id="domain-upper-case",
    ),
    pytest.param(
        {"allowed_domains": ["example.test."]}, "use 'example.test'", id="domain-trailing-dot"
    ),
    pytest.param({"allowed_domains": ["203.0.113.7"]}, "IP address", id="domain-ip-address"),
    pytest.param({"allowed_domains": ["*"]}, "'*'", id="domain-wildcard-alone"),
    pytest.param(
        {"allowed_domains": [f"d{index}.test" for index in range(257)]},
        "allowed_domains",
        id="domains-257",
    ),
]


@pytest.mark.parametrize(("change", "named"), INVALID_BODIES)
def test_invalid_create_request_is_422(
    change: dict[str, Any],
    named: str,
    client: httpx.Client,
    leftovers: Leftovers,
    echo_tarball: Tarball,
) -> None:
    """Post a valid body changed by `change`, where None removes a field.

    The error message must contain `named`, the field or value at fault.
    """
    url = unique_url(echo_tarball)
    body = {"image_url": url, "image_digest": echo_tarball.digest, **change}
    body = {name: value for name, value in body.items() if value is not None}

    response = client.post("/v1/agents", params={"wait": "true"}, json=body)

    message = assert_error(response, 422, "invalid_request")
    assert named in message
    assert_no_agent_for(client, url)
    leftovers.assert_none()


def test_http_url_in_production_is_422(
    production_stack: Stack, docker_client: docker.DockerClient, echo_tarball: Tarball
) -> None:
    url = unique_url(echo_tarball)
    leftovers = Leftovers(production_stack, docker_client)

    with httpx.Client(
        base_url=production_stack.api_url, headers=production_stack.headers, timeout=60
    ) as api:
        response = api.post(
            "/v1/agents",
            params={"wait": "true"},
            json={"image_url": url, "image_digest": echo_tarball.digest},
        )
        message = assert_error(response, 422, "invalid_request")
        assert "https://" in message
        assert_no_agent_for(api, url)
    leftovers.assert_none(digests=(echo_tarball.digest,))


def _create_body(url: str, digest: str, *, size: int) -> bytes:
    """Return a valid POST /v1/agents body of at least `size` bytes, padded with env values."""
    env = {f"PAD_{index}": "x" * 4000 for index in range(size // 4000 + 1)}
    body = json.dumps({"image_url": url, "image_digest": digest, "env": env}).encode()
    assert len(body) >= size
    return body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_create_body_is_413(
    chunked: bool, client: httpx.Client, leftovers: Leftovers, echo_tarball: Tarball
) -> None:
    url = unique_url(echo_tarball)
    body = _create_body(url, echo_tarball.digest, size=64 * KIB + 1)
    content: bytes | Iterator[bytes] = (
        iter([body[i : i + 8 * KIB] for i in range(0, len(body), 8 * KIB)]) if chunked else body
    )

    response = client.post(
        "/v1/agents", content=content, headers={"content-type": "application/json"}
    )

    message = assert_error(response, 413, "body_too_large")
    assert str(64 * KIB) in message
    assert_no_agent_for(client, url)
    leftovers.assert_none()


# ---------------------------------------------------------------------------------------------
# Authentication


BAD_CREDENTIALS = [
    pytest.param({}, id="missing"),
    pytest.param({"X-API-Key": ""}, id="empty-key"),
    pytest.param({"X-API-Key": "ar_" + "A" * 43}, id="wrong-key"),
    pytest.param({"X-API-Key": "x" * 300}, id="overlong-key"),
    pytest.param({"Authorization": "Bearer ar_wrong"}, id="wrong-bearer"),
    pytest.param({"Authorization": "Basic dXNlcjpwYXNzd29yZA=="}, id="basic-scheme"),
    pytest.param({"Authorization": "Bearer"}, id="bearer-empty"),
]


@pytest.mark.parametrize("headers", BAD_CREDENTIALS)
def test_bad_credentials_are_401(
    headers: dict[str, str],
    client: httpx.Client,
    stack: Stack,
    leftovers: Leftovers,
    echo_tarball: Tarball,
) -> None:
    url = unique_url(echo_tarball)

    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as anonymous:
        response = anonymous.post(
            "/v1/agents", json={"image_url": url, "image_digest": echo_tarball.digest}
        )

    message = assert_error(response, 401, "unauthorized")
    assert message == UNAUTHORIZED_MESSAGE
    assert response.headers["www-authenticate"] == "Bearer"
    assert_no_agent_for(client, url)
    leftovers.assert_none()


@pytest.mark.parametrize("parameter", ["api_key", "apiKey", "token", "key", "access_token"])
@pytest.mark.parametrize("with_header", [False, True], ids=["query-only", "header-too"])
def test_key_in_query_is_rejected(
    parameter: str,
    with_header: bool,
    *,
    client: httpx.Client,
    stack: Stack,
    leftovers: Leftovers,
    echo_tarball: Tarball,
) -> None:
    url = unique_url(echo_tarball)
    headers = stack.headers if with_header else {}

    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as caller:
        response = caller.post(
            "/v1/agents",
            params={parameter: stack.api_key},
            json={"image_url": url, "image_digest": echo_tarball.digest},
        )

    message = assert_error(response, 401, "api_key_in_query")
    assert "X-API-Key header" in message
    assert stack.api_key not in response.text
    assert_no_agent_for(client, url)
    leftovers.assert_none()


def test_auth_failures_are_audited(stack: Stack) -> None:
    requests = {
        "missing_key": ({}, {}),
        "invalid_key": ({"X-API-Key": "ar_wrong"}, {}),
        "api_key_in_query": ({}, {"api_key": stack.api_key}),
    }
    expected_types = {
        "missing_key": "auth.failed",
        "invalid_key": "auth.failed",
        "api_key_in_query": "auth.rejected",
    }
    request_ids = {}
    with httpx.Client(base_url=stack.api_url, timeout=60) as anonymous:
        for reason, (headers, params) in requests.items():
            request_id = f"bad-input-{uuid.uuid4().hex}"
            response = anonymous.get(
                "/v1/agents", headers={**headers, "X-Request-ID": request_id}, params=params
            )
            assert response.status_code == 401
            request_ids[reason] = request_id

    # Events are published in the background, so they may reach the stream after the reply.
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + AUDIT_WAIT_SECONDS
    while len(found) < len(request_ids) and time.monotonic() < deadline:
        by_request = {event["correlation_id"]: event for event in audit_events(stack)}
        found = {
            reason: by_request[request_id]
            for reason, request_id in request_ids.items()
            if request_id in by_request
        }
    assert found.keys() == request_ids.keys()
    for reason, event in found.items():
        assert event["type"] == expected_types[reason], event
        assert event["reason_code"] == reason, event
        assert event["outcome"] == "denied", event
        assert event["actor"] == "127.0.0.1", event
        assert event["details"]["client"] == "127.0.0.1", event
        assert event["details"]["path"] == "/v1/agents", event
        assert event["details"]["method"] == "GET", event
        assert stack.api_key not in json.dumps(event)
    # The key in the URL is a valid one, so the event names it for rotation.
    assert found["api_key_in_query"]["details"]["key_id"] == "tests"
    assert found["invalid_key"]["details"]["key_id"] is None


# ---------------------------------------------------------------------------------------------
# Unknown agents and the passthrough


UNKNOWN_AGENT_IDS = [
    pytest.param(f"ag-{'0' * 32}", id="well-formed"),
    pytest.param("ag-not-hex", id="malformed"),
    pytest.param(f"AG-{'A' * 32}", id="upper-case"),
]
AGENT_ROUTES = [
    pytest.param("GET", "", id="get"),
    pytest.param("DELETE", "", id="delete"),
    pytest.param("GET", "/logs", id="logs"),
    pytest.param("GET", "/http/", id="passthrough-get"),
    pytest.param("POST", "/http/cgi-bin/echo", id="passthrough-post"),
]


@pytest.mark.parametrize(("method", "suffix"), AGENT_ROUTES)
@pytest.mark.parametrize("agent_id", UNKNOWN_AGENT_IDS)
def test_unknown_agent_is_404(
    agent_id: str, method: str, suffix: str, client: httpx.Client, leftovers: Leftovers
) -> None:
    response = client.request(method, f"/v1/agents/{agent_id}{suffix}", content=b"")

    message = assert_error(response, 404, "agent_not_found")
    assert agent_id in message
    leftovers.assert_none()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_passthrough_body_is_413(
    chunked: bool, client: httpx.Client, leftovers: Leftovers, sink_agent: dict[str, Any]
) -> None:
    base = f"/v1/agents/{sink_agent['agent_id']}/http"
    body = b"x" * (11 * MIB)
    content: bytes | Iterator[bytes] = (
        iter([body[i : i + MIB] for i in range(0, len(body), MIB)]) if chunked else body
    )

    response = client.post(f"{base}/upload", content=content)

    message = assert_error(response, 413, "body_too_large")
    assert str(10 * MIB) in message
    reply = client.get(f"{base}/")
    assert reply.status_code == 200
    assert reply.text == "sink\n"
    leftovers.assert_none()


def test_passthrough_before_ready_is_409(
    client: httpx.Client, leftovers: Leftovers, never_ready_tarball: Tarball
) -> None:
    agent = start_agent(client, never_ready_tarball.url, never_ready_tarball.digest, wait=False)

    response = client.get(f"/v1/agents/{agent['agent_id']}/http/")

    message = assert_error(response, 409, "agent_not_ready")
    assert "not ready" in message
    stopped = client.delete(f"/v1/agents/{agent['agent_id']}")
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped"
    leftovers.assert_none(agent_id=agent["agent_id"], verified=never_ready_tarball.digest)


def test_passthrough_after_stop_is_409(
    client: httpx.Client,
    leftovers: Leftovers,
    echo_tarball: Tarball,
    loaded_images: list[str],
) -> None:
    expect_load(leftovers.client, loaded_images, echo_tarball)
    agent = start_agent(client, echo_tarball.url, echo_tarball.digest)
    assert agent["state"] == "ready", agent
    assert client.delete(f"/v1/agents/{agent['agent_id']}").status_code == 200

    response = client.get(f"/v1/agents/{agent['agent_id']}/http/")

    message = assert_error(response, 409, "agent_not_ready")
    assert "stopped" in message
    leftovers.assert_none(agent_id=agent["agent_id"], verified=echo_tarball.digest)
