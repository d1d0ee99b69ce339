"""Fixtures for tests against a real dockerd, NATS with JetStream and Redis.

scripts/deps.sh starts those and writes their connection settings to var/agent-runner.env;
the settings are read from there when the environment does not set them already.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import docker
import httpx
import pytest

from tests.support.images import build_echo_agent_image, save_image_tarball
from tests.support.stack import REPO_ROOT, FileServer, Stack, free_port, running_stack

ENV_FILE = REPO_ROOT / "var" / "agent-runner.env"


def _load_env_file() -> None:
    if not ENV_FILE.exists():
        return
    for line in ENV_FILE.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            os.environ.setdefault(name, value)


_load_env_file()


@dataclass(frozen=True)
class Tarball:
    """An image tarball served over HTTP."""

    path: Path
    digest: str
    url: str


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    client.close()


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    server = FileServer(tmp_path_factory.mktemp("served"))
    yield server
    server.close()


def make_tarball(
    client: docker.DockerClient, server: FileServer, image_id: str, name: str
) -> Tarball:
    """Save `image_id` into the served folder, remove the image and return the tarball."""
    path = server.directory / name
    digest = save_image_tarball(client, image_id, path)
    client.images.remove(image_id, force=True)
    return Tarball(path=path, digest=digest, url=server.url(name))


@pytest.fixture(scope="session")
def echo_tarball(docker_client: docker.DockerClient, served: FileServer) -> Iterator[Tarball]:
    image_id = build_echo_agent_image(docker_client)
    yield make_tarball(docker_client, served, image_id, "echo.tar")
    # The stacks loaded it again from the tarball under the same ID.
    with contextlib.suppress(docker.errors.NotFound):
        docker_client.images.remove(image_id, force=True)


@pytest.fixture(scope="session")
def unreachable_url() -> str:
    """An image URL that the session stack trusts but where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/image.tar"


def trusted_sources(*urls: str) -> list[str]:
    """Return supervisor flags that trust the origin of each URL.

    The supervisor refuses loopback image URLs unless a trusted source names the address, so
    every stack lists the test file servers it downloads from.
    """
    flags = []
    for url in urls:
        parts = urlsplit(url)
        flags.append(f"--trusted-image-sources={parts.scheme}://{parts.netloc}/")
    return flags


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, served: FileServer, unreachable_url: str
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("stack"),
        supervisor_args=[
            "--agent-start-timeout=10",
            "--agent-stop-grace=2",
            *trusted_sources(served.url(""), unreachable_url),
        ],
    ) as running:
        yield running


@pytest.fixture
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, headers=stack.headers, timeout=60) as client:
        yield client
