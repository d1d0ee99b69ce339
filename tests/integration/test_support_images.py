"""Self-test of the image helpers in tests/support/images.py against the real Docker daemon."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
from docker.errors import ImageNotFound

from tests.support.images import (
    ECHO_AGENT_ENTRYPOINT,
    build_busybox_image,
    build_echo_agent_image,
    echo_agent_files,
    save_image_tarball,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=120)
    yield client
    client.close()


def _manifest(tarball: Path) -> list[dict[str, object]]:
    with tarfile.open(tarball) as archive:
        member = archive.extractfile("manifest.json")
        assert member is not None
        manifest: list[dict[str, object]] = json.load(member)
    return manifest


def test_echo_agent_files_read() -> None:
    files = echo_agent_files()

    assert set(files) == {"entrypoint.sh", "www/index.html", "www/cgi-bin/echo"}
    assert files["entrypoint.sh"].startswith(b"#!/bin/sh\n")
    assert files["www/cgi-bin/echo"].startswith(b"#!/bin/sh\n")


def test_echo_image_saved_by_id(docker_client: docker.DockerClient, tmp_path: Path) -> None:
    tarball = tmp_path / "echo-agent.tar"

    image_id = build_echo_agent_image(docker_client)
    try:
        config = docker_client.images.get(image_id).attrs["Config"]
        digest = save_image_tarball(docker_client, image_id, tarball)
    finally:
        docker_client.images.remove(image_id)

    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image_id)
    assert config["Entrypoint"] == ECHO_AGENT_ENTRYPOINT
    assert config["WorkingDir"] == "/"
    assert config["Env"] == ["PATH=/bin"]
    assert config["Volumes"] is None
    assert digest == f"sha256:{hashlib.sha256(tarball.read_bytes()).hexdigest()}"
    manifest = _manifest(tarball)
    assert len(manifest) == 1
    assert not manifest[0]["RepoTags"]
    assert manifest[0]["Config"] == f"{image_id.removeprefix('sha256:')}.json"
    with pytest.raises(ImageNotFound):
        docker_client.images.get(image_id)


def test_echo_image_serves_hardened(docker_client: docker.DockerClient) -> None:
    image_id = build_echo_agent_image(docker_client)
    container = None
    try:
        # Create and start in two steps, so that the finally block also removes a container
        # whose start failed.
        container = docker_client.containers.create(
            image_id,
            user="65534:65534",
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            sysctls={"net.ipv4.ip_unprivileged_port_start": "0"},
            ports={"80/tcp": ("127.0.0.1", None)},
        )
        container.start()
        container.reload()
        host_port = container.ports["80/tcp"][0]["HostPort"]
        base_url = f"http://127.0.0.1:{host_port}"

        # trust_env=False keeps proxy variables from the environment out of the way.
        with httpx.Client(base_url=base_url, timeout=5, trust_env=False) as http:
            deadline = time.monotonic() + 10
            while True:
                try:
                    index = http.get("/")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.25)
            echo = http.post("/cgi-bin/echo", params={"x": "1"}, content=b"ping body")
        logs = container.logs().decode()
    finally:
        if container is not None:
            container.remove(force=True)
        docker_client.images.remove(image_id)

    assert index.status_code == 200
    assert "echo-agent is running" in index.text
    assert echo.status_code == 200
    assert echo.headers["content-type"] == "text/plain"
    assert "method: POST\n" in echo.text
    assert "path: /cgi-bin/echo\n" in echo.text
    assert "query: x=1\n" in echo.text
    assert echo.text.endswith("body:\nping body")
    assert "echo-agent: listening on port 80" in logs
    assert "echo-agent: POST /cgi-bin/echo?x=1 body_bytes=9" in logs


def test_busybox_image_tagged_on_request(
    docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    tag = "agent-runner-test/support-images:selftest"
    tarball = tmp_path / "tagged.tar"

    image_id = build_busybox_image(
        docker_client,
        entrypoint=None,
        cmd=["/bin/sh", "-c", "true"],
        workdir="/srv",
        extra_files={"srv/data/hello.txt": b"hello\n"},
        tag=tag,
    )
    try:
        image = docker_client.images.get(image_id)
        save_image_tarball(docker_client, tag, tarball)
    finally:
        docker_client.images.remove(image_id, force=True)

    assert image.tags == [tag]
    assert image.attrs["Config"]["Cmd"] == ["/bin/sh", "-c", "true"]
    assert image.attrs["Config"]["Entrypoint"] is None
    assert image.attrs["Config"]["WorkingDir"] == "/srv"
    assert _manifest(tarball)[0]["RepoTags"] == [tag]


def test_extra_file_replaces_applet(docker_client: docker.DockerClient) -> None:
    image_id = build_busybox_image(
        docker_client,
        entrypoint=["/bin/sh"],
        cmd=None,
        extra_files={"bin/sh": b"#!/bin/busybox ash\necho replaced sh\n"},
    )
    try:
        output = docker_client.containers.run(
            image_id, remove=True, user="65534:65534", network_mode="none"
        )
    finally:
        docker_client.images.remove(image_id)

    assert output == b"replaced sh\n"


@pytest.mark.parametrize(
    ("extra_files", "message"),
    [
        ({"/etc/passwd": b"x"}, "relative to the image root"),
        ({"../outside": b"x"}, "relative to the image root"),
        ({"www/../../outside": b"x"}, "relative to the image root"),
        ({"": b"x"}, "relative to the image root"),
        ({".": b"x"}, "relative to the image root"),
        ({"bin/busybox": b"x"}, "replace the busybox binary"),
        ({"etc": b"x"}, "clash with directories"),
        ({"www": b"x", "www/index.html": b"x"}, "clash with directories"),
    ],
)
def test_busybox_image_rejects_bad_path(
    docker_client: docker.DockerClient, extra_files: dict[str, bytes], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_busybox_image(docker_client, entrypoint=None, cmd=None, extra_files=extra_files)
