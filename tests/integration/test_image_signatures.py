"""Image signatures on a real stack: who may publish an image that the runner will start.

The production stack trusts one ECDSA P-256 key, one Ed25519 key and a private Sigstore
instance with a pinned identity and issuer, all made by the test (tests/support/signing.py).
Nothing reaches a public Sigstore service. Its supervisor accepts http:// image URLs
explicitly and trusts the file server's origin as an image source, because the tarballs are
served from 127.0.0.1. Each rejection is checked for its
reason code, its audit event, and that nothing was loaded or cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from tests.integration.conftest import Tarball, make_tarball, trusted_sources
from tests.support.images import ECHO_AGENT_ENTRYPOINT, build_busybox_image, echo_agent_files
from tests.support.signing import (
    SigstoreInstance,
    key_fingerprint,
    make_ecdsa_key,
    make_ed25519_key,
    sign_blob,
    write_public_key,
)
from tests.support.stack import FileServer, Stack, running_stack, wait_for_state

pytestmark = pytest.mark.integration

IDENTITY = "release@agents.test"
ISSUER = "https://issuer.agents.test"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Signers:
    """The keys and Sigstore instance the production stack trusts, and one it does not."""

    ecdsa: Any
    ed25519: Any
    untrusted: Any
    sigstore: SigstoreInstance
    folder: Path


@dataclass(frozen=True)
class Images:
    """Two distinct small images as served tarballs."""

    first: Tarball
    second: Tarball
    image_ids: tuple[str, str]


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> Signers:
    folder = tmp_path_factory.mktemp("signers")
    result = Signers(
        ecdsa=make_ecdsa_key(),
        ed25519=make_ed25519_key(),
        untrusted=make_ecdsa_key(),
        sigstore=SigstoreInstance(),
        folder=folder,
    )
    write_public_key(result.ecdsa, folder / "ecdsa.pub")
    write_public_key(result.ed25519, folder / "ed25519.pub")
    result.sigstore.write_trusted_root(folder / "trusted_root.json")
    return result


@pytest.fixture(scope="module")
def images(
    tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient
) -> Iterator[tuple[Images, FileServer]]:
    served = FileServer(tmp_path_factory.mktemp("signed-served"))
    tarballs = []
    image_ids = []
    try:
        for name in ("first", "second"):
            # A random file per image, so no other test shares its image ID.
            image_id = build_busybox_image(
                docker_client,
                entrypoint=list(ECHO_AGENT_ENTRYPOINT),
                cmd=None,
                extra_files={**echo_agent_files(), "etc/variant": uuid.uuid4().hex.encode()},
            )
            image_ids.append(image_id)
            tarballs.append(make_tarball(docker_client, served, image_id, f"{name}.tar"))
        yield (
            Images(first=tarballs[0], second=tarballs[1], image_ids=(image_ids[0], image_ids[1])),
            served,
        )
    finally:
        served.close()
        for image_id in image_ids:
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.images.remove(image_id, force=True)


@pytest.fixture(scope="module")
def production(
    tmp_path_factory: pytest.TempPathFactory,
    signers: Signers,
    images: tuple[Images, FileServer],
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("signed-stack"),
        profile="production",
        network="agent-runner-signed",
        subnet="172.29.14.0/24",
        bridge="ar-signed0",
        api_args=["--allow-http-image-urls", "--insecure-http"],
        supervisor_args=[
            "--allow-http-image-urls",
            f"--image-signing-key={signers.folder / 'ecdsa.pub'}",
            f"--image-signing-key={signers.folder / 'ed25519.pub'}",
            f"--image-signing-trusted-root={signers.folder / 'trusted_root.json'}",
            f"--image-signing-identity={IDENTITY}",
            f"--image-signing-issuer={ISSUER}",
            "--agent-start-timeout=20",
            *trusted_sources(images[1].url("")),
        ],
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def api(production: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=production.api_url, headers=production.headers, timeout=60
    ) as client:
        yield client


@dataclass(frozen=True)
class Env:
    """Everything the tests of the production stack use."""

    api: httpx.Client
    stack: Stack
    signers: Signers
    images: Images
    served: FileServer
    docker: docker.DockerClient


@pytest.fixture(scope="module")
def env(
    api: httpx.Client,
    production: Stack,
    signers: Signers,
    images: tuple[Images, FileServer],
    docker_client: docker.DockerClient,
) -> Env:
    return Env(
        api=api,
        stack=production,
        signers=signers,
        images=images[0],
        served=images[1],
        docker=docker_client,
    )


def start(api: httpx.Client, tarball: Tarball, **fields: Any) -> dict[str, Any]:
    response = api.post(
        "/v1/agents",
        json={"image_url": tarball.url, "image_digest": tarball.digest, **fields},
    )
    assert response.status_code == 202, response.text
    agent: dict[str, Any] = response.json()
    return wait_for_state(api, agent["agent_id"], {"ready", "failed"}, timeout=START_TIMEOUT)


def stop(api: httpx.Client, agent: dict[str, Any]) -> None:
    api.delete(f"/v1/agents/{agent['agent_id']}")


def assert_rejected(
    env: Env, agent: dict[str, Any], tarball: Tarball, image_id: str, reason: str
) -> None:
    """The agent failed with `reason`, which was audited, and nothing was loaded or cached."""
    assert agent["state"] == "failed", agent
    assert agent["failure_reason"] == reason, agent
    events = env.stack.audit_events(agent["agent_id"])
    failed = [event for event in events if event["type"] == "image.verification_failed"]
    assert [event["reason_code"] for event in failed] == [reason], events
    with pytest.raises(docker.errors.ImageNotFound):
        env.docker.images.get(image_id)
    cache = env.stack.workdir / "cache"
    assert not (cache / "sha256" / f"{tarball.digest.removeprefix('sha256:')}.tar").exists()
    assert list((cache / "partial").iterdir()) == []


def test_ecdsa_signed_image_runs(env: Env) -> None:
    tarball = env.images.first

    agent = start(env.api, tarball, image_signature=sign_blob(tarball.path, env.signers.ecdsa))

    try:
        assert agent["state"] == "ready", agent
        assert agent["image_signer"] == f"key {key_fingerprint(env.signers.ecdsa)}"
        [verified] = [
            event
            for event in env.stack.audit_events(agent["agent_id"])
            if event["type"] == "image.verified"
        ]
        assert verified["details"]["signer"] == agent["image_signer"]
    finally:
        stop(env.api, agent)


def test_signature_checked_again_for_a_cached_image(env: Env) -> None:
    # The first test cached and loaded this image; a start without a signature still fails.
    agent = start(env.api, env.images.first)

    assert agent["state"] == "failed", agent
    assert agent["failure_reason"] == "signature_missing", agent


def test_ed25519_signed_image_runs(env: Env) -> None:
    tarball = env.images.second

    agent = start(env.api, tarball, image_signature=sign_blob(tarball.path, env.signers.ed25519))

    try:
        assert agent["state"] == "ready", agent
        assert agent["image_signer"] == f"key {key_fingerprint(env.signers.ed25519)}"
    finally:
        stop(env.api, agent)


@pytest.fixture
def fresh_image(env: Env) -> Iterator[tuple[Tarball, str]]:
    """A third image, never started, so that its rejection can be shown to load nothing."""
    image_id = build_busybox_image(
        env.docker,
        entrypoint=list(ECHO_AGENT_ENTRYPOINT),
        cmd=None,
        extra_files={**echo_agent_files(), "etc/variant": uuid.uuid4().hex.encode()},
    )
    name = f"fresh-{uuid.uuid4().hex[:8]}.tar"
    tarball = make_tarball(env.docker, env.served, image_id, name)
    yield tarball, image_id
    tarball.path.unlink(missing_ok=True)
    with contextlib.suppress(docker.errors.NotFound):
        env.docker.images.remove(image_id, force=True)


def test_unsigned_image_rejected_in_production(env: Env, fresh_image: tuple[Tarball, str]) -> None:
    tarball, image_id = fresh_image

    agent = start(env.api, tarball)

    assert_rejected(env, agent, tarball, image_id, "signature_missing")


def test_untrusted_key_rejected(env: Env, fresh_image: tuple[Tarball, str]) -> None:
    tarball, image_id = fresh_image

    agent = start(env.api, tarball, image_signature=sign_blob(tarball.path, env.signers.untrusted))

    assert_rejected(env, agent, tarball, image_id, "signature_invalid")


def test_signature_of_another_tarball_rejected(env: Env, fresh_image: tuple[Tarball, str]) -> None:
    tarball, image_id = fresh_image
    other = env.images.first

    agent = start(env.api, tarball, image_signature=sign_blob(other.path, env.signers.ecdsa))

    assert_rejected(env, agent, tarball, image_id, "signature_invalid")


def test_tarball_changed_after_signing_rejected(env: Env, fresh_image: tuple[Tarball, str]) -> None:
    tarball, image_id = fresh_image
    signature = sign_blob(tarball.path, env.signers.ecdsa)
    # The publisher's signature travels with a tarball that was changed afterwards, and the
    # attacker gives the changed file's digest, so the digest check alone cannot notice.
    tampered = env.served.directory / f"tampered-{uuid.uuid4().hex[:8]}.tar"
    shutil.copyfile(tarball.path, tampered)
    with tampered.open("ab") as handle:
        handle.write(b"\0" * 1024)
    digest = "sha256:" + hashlib.sha256(tampered.read_bytes()).hexdigest()
    changed = Tarball(path=tampered, digest=digest, url=env.served.url(tampered.name))

    try:
        agent = start(env.api, changed, image_signature=signature)

        assert_rejected(env, agent, changed, image_id, "signature_invalid")
    finally:
        tampered.unlink(missing_ok=True)


def test_sigstore_bundle_of_pinned_identity_runs(env: Env) -> None:
    tarball = env.images.first
    bundle = env.signers.sigstore.sign(tarball.path, identity=IDENTITY, issuer=ISSUER)

    agent = start(env.api, tarball, image_bundle=bundle)

    try:
        assert agent["state"] == "ready", agent
        assert agent["image_signer"] == f"sigstore {IDENTITY} ({ISSUER})"
    finally:
        stop(env.api, agent)


@pytest.mark.parametrize(
    ("identity", "issuer"),
    [
        pytest.param("someone@agents.test", ISSUER, id="other-identity"),
        pytest.param(IDENTITY, "https://other-issuer.test", id="other-issuer"),
    ],
)
def test_sigstore_bundle_of_unpinned_signer_rejected(
    env: Env, fresh_image: tuple[Tarball, str], identity: str, issuer: str
) -> None:
    tarball, image_id = fresh_image
    bundle = env.signers.sigstore.sign(tarball.path, identity=identity, issuer=issuer)

    agent = start(env.api, tarball, image_bundle=bundle)

    assert_rejected(env, agent, tarball, image_id, "signer_not_trusted")


def test_oversized_bundle_rejected_by_gateway(env: Env) -> None:
    tarball = env.images.first

    response = env.api.post(
        "/v1/agents",
        json={
            "image_url": tarball.url,
            "image_digest": tarball.digest,
            "image_bundle": {"padding": "x" * 70_000},
        },
    )

    assert response.status_code in (413, 422), response.text


def test_unsigned_image_runs_in_development_with_warning(
    tmp_path_factory: pytest.TempPathFactory, fresh_image: tuple[Tarball, str]
) -> None:
    tarball, _ = fresh_image
    with (
        running_stack(
            tmp_path_factory.mktemp("unsigned-stack"),
            network="agent-runner-unsigned",
            subnet="172.29.15.0/24",
            bridge="ar-unsigned0",
            supervisor_args=trusted_sources(tarball.url),
        ) as stack,
        httpx.Client(base_url=stack.api_url, headers=stack.headers, timeout=60) as client,
    ):
        agent = start(client, tarball)
        try:
            assert agent["state"] == "ready", agent
            assert agent["image_signer"] == "unsigned"
            events = stack.audit_events(agent["agent_id"])
            unsigned = [event for event in events if event["type"] == "image.unsigned"]
            assert len(unsigned) == 1, events
            assert "runs image" in stack.log_text("supervisor")
            assert "unsigned" in stack.log_text("supervisor")
        finally:
            stop(client, agent)
