"""Docker calls of the supervisor, with docker SDK errors translated at this boundary.

Every function here blocks; the supervisor runs them in worker threads. Containers and images
are referred to by ID only, never by a tag, because anyone who loads an image with the same
name can move a tag.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from docker.models.containers import Container
from docker.types import CancellableStream, IPAMConfig, IPAMPool

from libs.common import logs
from services.supervisor.container_spec import (
    AGENT_PORT,
    LABEL_AGENT_ID,
    LABEL_HOST_ID,
    LABEL_MANAGED,
)
from services.supervisor.errors import AgentStartError, DockerUnavailable, FailureReason
from services.supervisor.settings import SupervisorSettings

logger = logging.getLogger(__name__)

DOCKER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


class ImageRemoval(StrEnum):
    """Result of `remove_image`."""

    REMOVED = "removed"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"


@dataclass(frozen=True, kw_only=True)
class ContainerStatus:
    """The parts of `docker inspect` the supervisor acts on."""

    container_id: str
    agent_id: str | None
    status: str
    running: bool
    exit_code: int | None
    oom_killed: bool
    labels: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class LogFrame:
    """One message of a followed log stream: Docker's timestamp and the bytes after it."""

    time: datetime | None
    payload: bytes


@dataclass(frozen=True, kw_only=True)
class RawLogLine:
    """One line of container output before sanitising."""

    stream: str
    time: datetime | None
    data: bytes


class DockerAdapter:
    """Thin, typed wrapper over the docker SDK client."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    @classmethod
    def from_environment(cls, *, max_pool_size: int | None = None) -> DockerAdapter:
        """Connect to the daemon named by DOCKER_HOST (default: the local socket).

        `max_pool_size` is the number of connections kept open, or the SDK's default (10) when
        None. Each followed log stream keeps one for as long as it runs.
        """
        options = {} if max_pool_size is None else {"max_pool_size": max_pool_size}
        try:
            client = docker.from_env(timeout=120, **options)
            client.ping()
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(
                f"cannot reach the Docker daemon: {exc}; start dockerd or set DOCKER_HOST"
            ) from exc
        return cls(client)

    def daemon_security_options(self) -> list[str]:
        """Return the daemon's security options, such as 'name=seccomp,profile=default'."""
        try:
            info = self.client.info()
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"docker info failed: {exc}") from exc
        return [str(option) for option in info.get("SecurityOptions") or []]

    def ensure_sandbox_network(self, settings: SupervisorSettings) -> str:
        """Create the sandbox bridge unless it exists with the expected settings; return its ID.

        Raises DockerUnavailable when a network of that name exists with other settings,
        because agents must never join a network whose isolation we did not set.
        """
        name = settings.sandbox_network
        try:
            existing = self.client.networks.list(names=[name])
            for network in existing:
                if network.name == name:
                    self._check_network(network.attrs, settings)
                    return str(network.id)
            network = self.client.networks.create(
                name,
                driver="bridge",
                internal=False,
                check_duplicate=True,
                ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=str(settings.sandbox_subnet))]),
                options={
                    "com.docker.network.bridge.enable_icc": "false",
                    "com.docker.network.bridge.name": settings.sandbox_bridge,
                },
                labels={LABEL_MANAGED: "true"},
            )
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot create sandbox network {name!r}: {exc}") from exc
        logger.info("created sandbox network %s on %s", name, settings.sandbox_subnet)
        return str(network.id)

    @staticmethod
    def _check_network(attrs: dict[str, Any], settings: SupervisorSettings) -> None:
        options = attrs.get("Options") or {}
        subnets = [c.get("Subnet") for c in (attrs.get("IPAM") or {}).get("Config") or []]
        problems = []
        if options.get("com.docker.network.bridge.enable_icc") != "false":
            problems.append("inter-container communication is enabled")
        if subnets != [str(settings.sandbox_subnet)]:
            problems.append(f"subnets are {subnets}, expected [{settings.sandbox_subnet}]")
        if (attrs.get("Labels") or {}).get(LABEL_MANAGED) != "true":
            problems.append("it was not created by agent-runner")
        if problems:
            raise DockerUnavailable(
                f"network {settings.sandbox_network!r} exists but "
                + "; ".join(problems)
                + "; remove it or choose another --sandbox-network"
            )

    def image_exists(self, image_id: str) -> bool:
        """Return whether the daemon has an image with exactly this ID."""
        try:
            self.client.images.get(image_id)
        except docker.errors.ImageNotFound:
            return False
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot inspect image {image_id}: {exc}") from exc
        return True

    def tag_owner(self, tag: str) -> str | None:
        """Return the ID of the image that `tag` names now, or None."""
        try:
            return str(self.client.images.get(tag).id)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            if exc.status_code == 400:
                return None  # not a valid reference, so it cannot name an image either
            raise DockerUnavailable(f"cannot inspect tag {tag!r}: {exc}") from exc
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot inspect tag {tag!r}: {exc}") from exc

    def containers_using_image(self, image_id: str) -> list[str]:
        """Return the IDs of our labelled containers, of any host, created from `image_id`."""
        try:
            containers = self.client.containers.list(
                all=True, filters={"label": f"{LABEL_MANAGED}=true", "ancestor": image_id}
            )
        except docker.errors.NotFound:
            return []
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot list containers of image {image_id}: {exc}") from exc
        # The ancestor filter also matches images built on top of this one.
        return [str(c.id) for c in containers if c.attrs.get("Image") == image_id]

    def remove_image(self, image_id: str) -> ImageRemoval:
        """Remove the image with exactly this ID, never forcing it.

        Docker refuses (CONFLICT) while any container, running or stopped, uses the image or
        while several tags name it.
        """
        try:
            self.client.images.remove(image_id, force=False, noprune=False)
        except docker.errors.ImageNotFound:
            return ImageRemoval.NOT_FOUND
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                logger.warning(
                    "docker kept image %s: %s",
                    image_id,
                    exc.explanation,
                    extra={logs.IMAGE_ID: image_id},
                )
                return ImageRemoval.CONFLICT
            raise DockerUnavailable(f"cannot remove image {image_id}: {exc}") from exc
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot remove image {image_id}: {exc}") from exc
        logger.info("removed image %s", image_id, extra={logs.IMAGE_ID: image_id})
        return ImageRemoval.REMOVED

    def load_image(self, path: Path) -> list[str]:
        """Run `docker load` on a checked tarball and return the IDs it reports."""
        try:
            with path.open("rb") as tarball:
                images = self.client.images.load(tarball)
        except DOCKER_ERRORS as exc:
            raise AgentStartError(FailureReason.LOAD_FAILED, f"docker load failed: {exc}") from exc
        return [str(image.id) for image in images]

    def create_and_start(self, arguments: dict[str, Any]) -> str:
        """Create a container from `arguments`, start it and return its ID.

        A container that was created but failed to start is removed before raising.
        """
        try:
            container = self.client.containers.create(**arguments)
        except DOCKER_ERRORS as exc:
            raise AgentStartError(
                FailureReason.CREATE_FAILED, f"docker create failed: {exc}"
            ) from exc
        try:
            container.start()
        except DOCKER_ERRORS as exc:
            self.remove(str(container.id))
            raise AgentStartError(
                FailureReason.START_FAILED, f"docker start failed: {exc}"
            ) from exc
        return str(container.id)

    def published_port(self, container_id: str) -> tuple[str, int]:
        """Return the host address and port that Docker published for the agent's port 80.

        Raises AgentStartError: EXITED_BEFORE_READY when the container has already exited,
        START_FAILED when it runs without a binding.
        """
        container = self._get(container_id)
        bindings = (container.attrs.get("NetworkSettings") or {}).get("Ports", {}).get(AGENT_PORT)
        if not bindings:
            # Docker (20.10) removes the bindings of a container that has exited, so an agent
            # that exits at once has none.
            status = _status_of(container)
            if not status.running:
                raise AgentStartError(
                    FailureReason.EXITED_BEFORE_READY,
                    f"container {container_id[:12]} exited with code {status.exit_code} before "
                    "answering HTTP on port 80",
                )
            raise AgentStartError(
                FailureReason.START_FAILED, f"container {container_id[:12]} has no port binding"
            )
        return str(bindings[0]["HostIp"]), int(bindings[0]["HostPort"])

    def sandbox_address(self, container_id: str, network: str) -> str:
        """Return the container's IPv4 address on `network`; raises AgentStartError if none."""
        container = self._get(container_id)
        networks = (container.attrs.get("NetworkSettings") or {}).get("Networks") or {}
        address = str((networks.get(network) or {}).get("IPAddress") or "")
        if not address:
            status = _status_of(container)
            if not status.running:
                raise AgentStartError(
                    FailureReason.EXITED_BEFORE_READY,
                    f"container {container_id[:12]} exited with code {status.exit_code} before "
                    "answering HTTP on port 80",
                )
            raise AgentStartError(
                FailureReason.START_FAILED,
                f"container {container_id[:12]} has no address on network {network!r}",
            )
        return address

    def volume_sources(self, container_id: str) -> dict[str, str]:
        """Return the host folder of each volume of the container, by path inside it.

        Raises DockerUnavailable when the container cannot be inspected.
        """
        mounts = self._get(container_id).attrs.get("Mounts") or []
        return {
            str(mount["Destination"]): str(mount["Source"])
            for mount in mounts
            if mount.get("Type") == "volume" and mount.get("Destination") and mount.get("Source")
        }

    def status(self, container_id: str) -> ContainerStatus | None:
        """Return the container's state, or None when it no longer exists."""
        try:
            container = self.client.containers.get(container_id)
        except docker.errors.NotFound:
            return None
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot inspect container {container_id}: {exc}") from exc
        return _status_of(container)

    def list_managed(self, host_id: str) -> list[ContainerStatus]:
        """Return every container that carries our labels for `host_id`, running or not."""
        try:
            containers = self.client.containers.list(
                all=True,
                filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_HOST_ID}={host_id}"]},
            )
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot list containers: {exc}") from exc
        return [_status_of(container) for container in containers]

    def stop(self, container_id: str, *, grace: int) -> ContainerStatus | None:
        """Stop the container (SIGTERM, then SIGKILL after `grace` seconds) and return its state."""
        try:
            self.client.containers.get(container_id).stop(timeout=grace)
        except docker.errors.NotFound:
            return None
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot stop container {container_id}: {exc}") from exc
        return self.status(container_id)

    def remove(self, container_id: str) -> None:
        """Remove the container and its anonymous storage; a missing container is fine."""
        try:
            self.client.containers.get(container_id).remove(force=True, v=True)
        except docker.errors.NotFound:
            return
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot remove container {container_id}: {exc}") from exc
        logger.info(
            "removed container %s", container_id[:12], extra={logs.CONTAINER_ID: container_id}
        )

    def remove_dangling_volumes(self, host_id: str, agent_id: str | None = None) -> list[str]:
        """Remove our unused volumes for `host_id` (and `agent_id`); return their names.

        `remove` takes an agent's volumes with its container, but a container removed by
        someone else without `-v` leaves them behind. Volumes still in use are kept.
        """
        labels = [f"{LABEL_MANAGED}=true", f"{LABEL_HOST_ID}={host_id}"]
        if agent_id is not None:
            labels.append(f"{LABEL_AGENT_ID}={agent_id}")
        try:
            volumes = self.client.volumes.list(filters={"label": labels, "dangling": True})
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot list volumes: {exc}") from exc
        removed = []
        for volume in volumes:
            owner = (volume.attrs.get("Labels") or {}).get(LABEL_AGENT_ID)
            try:
                volume.remove()
            except docker.errors.NotFound:
                continue
            except docker.errors.APIError as exc:
                # 409: a container started using it since the listing.
                logger.warning(
                    "kept volume %s of agent %s: %s",
                    volume.name,
                    owner,
                    exc,
                    extra={logs.AGENT_ID: owner},
                )
                continue
            except DOCKER_ERRORS as exc:
                raise DockerUnavailable(f"cannot remove volume {volume.name}: {exc}") from exc
            logger.info(
                "removed volume %s left by agent %s",
                volume.name,
                owner,
                extra={logs.AGENT_ID: owner},
            )
            removed.append(str(volume.name))
        return removed

    def logs(self, container_id: str, *, tail: int) -> list[RawLogLine]:
        """Return the last `tail` lines of each stream, oldest first."""
        container = self._get(container_id)
        lines: list[RawLogLine] = []
        for stream in ("stdout", "stderr"):
            try:
                raw = container.logs(
                    stdout=stream == "stdout", stderr=stream == "stderr", timestamps=True, tail=tail
                )
            except DOCKER_ERRORS as exc:
                raise DockerUnavailable(f"cannot read logs of {container_id}: {exc}") from exc
            lines.extend(_split_log(raw, stream))
        lines.sort(key=lambda line: line.time or datetime.min.replace(tzinfo=UTC))
        return lines[-tail:]

    def follow_logs(self, container_id: str, *, stream: str, since: datetime | None) -> LogFollow:
        """Open a followed, timestamped log stream of `stream` ("stdout" or "stderr").

        `since` skips output that Docker logged before that time; None starts at the first
        line. Raises DockerUnavailable when the container is gone or the daemon fails.
        """
        try:
            frames = self.client.api.logs(
                container_id,
                stdout=stream == "stdout",
                stderr=stream == "stderr",
                stream=True,
                follow=True,
                timestamps=True,
                since=None if since is None else since.timestamp(),
            )
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot follow logs of {container_id}: {exc}") from exc
        return LogFollow(container_id, frames)

    def _get(self, container_id: str) -> Container:
        try:
            return self.client.containers.get(container_id)
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"cannot inspect container {container_id}: {exc}") from exc


class LogFollow:
    """One followed log stream; iterate `frames` in one thread and `close` from any other."""

    def __init__(self, container_id: str, frames: CancellableStream) -> None:
        self._container_id = container_id
        self._frames = frames

    def frames(self) -> Iterator[LogFrame]:
        """Yield Docker's log messages until the container stops or `close` is called.

        Docker sends each message as one frame that starts with its timestamp. A line longer
        than the daemon's log buffer (16 KiB in Docker 20.10) arrives as several frames, each
        with its own timestamp, and only the last ends in a newline.
        Raises DockerUnavailable when the daemon fails mid-stream.
        """
        try:
            for frame in self._frames:
                stamp, _, payload = frame.partition(b" ")
                time = _parse_docker_time(stamp)
                yield LogFrame(time=time, payload=frame if time is None else payload)
        except DOCKER_ERRORS as exc:
            raise DockerUnavailable(f"log stream of {self._container_id} failed: {exc}") from exc

    def close(self) -> None:
        """End the stream, so that the thread iterating `frames` stops at its next read."""
        with contextlib.suppress(*DOCKER_ERRORS, OSError):
            self._frames.close()


def _status_of(container: Container) -> ContainerStatus:
    state = container.attrs.get("State") or {}
    labels = dict(container.labels or {})
    exit_code = state.get("ExitCode")
    return ContainerStatus(
        container_id=str(container.id),
        agent_id=labels.get("io.agent-runner.agent-id"),
        status=str(state.get("Status", "unknown")),
        running=bool(state.get("Running")),
        exit_code=None if state.get("Running") or exit_code is None else int(exit_code),
        oom_killed=bool(state.get("OOMKilled")),
        labels=labels,
    )


def _split_log(raw: bytes, stream: str) -> list[RawLogLine]:
    lines = []
    for entry in raw.split(b"\n"):
        if not entry:
            continue
        stamp, _, data = entry.partition(b" ")
        time = _parse_docker_time(stamp)
        if time is None:
            data = entry
        lines.append(RawLogLine(stream=stream, time=time, data=data))
    return lines


def _parse_docker_time(stamp: bytes) -> datetime | None:
    # Docker writes RFC 3339 with up to nine fraction digits and trailing zeros dropped;
    # Python's parser takes at most six.
    try:
        text = stamp.decode("ascii")
        if not text.endswith("Z"):
            return None
        whole, _, fraction = text[:-1].partition(".")
        return datetime.fromisoformat(f"{whole}.{(fraction or '0')[:6]:0<6}+00:00")
    except (UnicodeDecodeError, ValueError):
        return None
