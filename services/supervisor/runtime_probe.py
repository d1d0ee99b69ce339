"""Startup probe of the agents' OCI runtime: does gVisor really run containers on this host?

A runtime entry in daemon.json proves nothing: Debian's runsc is registered without error and
then fails every container on kernels from about 6.10. So with --runtime=runsc the
supervisor first checks that `docker info` lists the runtime, then runs one container under
it with the agents' hardening and no network, and reads /proc/version inside. gVisor
implements its own kernel, whose version string differs from the host's. Under runc the
container reads the host's. The result goes to the log, the metrics and the audit trail
(runtime.probed), and --require-gvisor stops the supervisor when the probe fails.

The probe image contains one file, the host's statically linked busybox, imported with
`docker import` because there is no registry to pull from. It is labelled with the binary's
digest and reused by later starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import tarfile
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import docker.errors

from libs.common.audit import AuditPublisher
from libs.common.errors import ConfigurationError
from libs.common.messages import AuditOutcome
from services.supervisor import metrics
from services.supervisor.container_spec import AGENT_USER
from services.supervisor.docker_adapter import DOCKER_ERRORS, DockerAdapter
from services.supervisor.gvisor_options import nproc_ulimits, resolv_conf_path, write_resolv_conf
from services.supervisor.settings import SupervisorSettings

logger = logging.getLogger(__name__)

LABEL_PROBE_IMAGE = "io.agent-runner.runtime-probe-image"
LABEL_PROBE_HOST = "io.agent-runner.runtime-probe-host"
PROBE_BINARY_PATH = "/busybox"
HOST_PROC_VERSION = Path("/proc/version")
# Characters of container output kept in the probe's detail message.
MAX_DETAIL_OUTPUT = 300


class GvisorStatus(StrEnum):
    """Result of the startup probe, as shown in metrics, audit events and logs."""

    AVAILABLE = "available"
    NOT_REGISTERED = "not_registered"
    START_FAILED = "start_failed"
    NOT_GVISOR = "not_gvisor"
    PROBE_IMAGE_FAILED = "probe_image_failed"
    NOT_PROBED = "not_probed"


@dataclass(frozen=True, kw_only=True)
class RuntimeProbeResult:
    """Findings of the startup probe about the runtime that agents use."""

    runtime: str
    docker_runtime: str
    status: GvisorStatus
    detail: str
    kernel: str = ""
    duration: float = 0.0

    @property
    def gvisor_available(self) -> bool:
        """Whether a probe container ran under the runtime and saw a kernel not the host's."""
        return self.status == GvisorStatus.AVAILABLE

    def as_details(self) -> dict[str, Any]:
        """Return the result as audit event details."""
        return {
            "runtime": self.runtime,
            "docker_runtime": self.docker_runtime,
            "status": self.status.value,
            "detail": self.detail,
            "kernel": self.kernel,
            "duration_seconds": round(self.duration, 3),
        }


class ProbeFailed(Exception):
    """The probe found the runtime unusable; `status` names the step that failed."""

    def __init__(self, status: GvisorStatus, detail: str, *, kernel: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kernel = kernel


def probe_runtime(
    docker_adapter: DockerAdapter, settings: SupervisorSettings, *, seccomp_profile: str
) -> RuntimeProbeResult:
    """Run the probe (see the module docstring) and return its result; never raises.

    Blocks for up to --runtime-probe-timeout seconds plus Docker's own calls, so callers run
    it in a worker thread. Every failure, Docker errors included, becomes a result whose
    status names the failed step.
    """
    started = time.monotonic()
    if settings.runtime != "runsc":
        status, detail, kernel = GvisorStatus.NOT_PROBED, f"--runtime is {settings.runtime!r}", ""
    else:
        try:
            kernel = _probe_gvisor(docker_adapter.client, settings, seccomp_profile)
            status, detail = GvisorStatus.AVAILABLE, "the probe container ran under gVisor"
        except ProbeFailed as exc:
            status, detail, kernel = exc.status, exc.detail, exc.kernel
    return RuntimeProbeResult(
        runtime=settings.runtime,
        docker_runtime=settings.docker_runtime,
        status=status,
        detail=detail,
        kernel=kernel,
        duration=time.monotonic() - started,
    )


def _probe_gvisor(
    client: docker.DockerClient, settings: SupervisorSettings, seccomp_profile: str
) -> str:
    """Run the probe container; return its /proc/version line or raise ProbeFailed."""
    try:
        registered = sorted((client.info().get("Runtimes") or {}).keys())
    except DOCKER_ERRORS as exc:
        raise ProbeFailed(GvisorStatus.NOT_REGISTERED, f"docker info failed: {exc}") from exc
    if settings.docker_runtime not in registered:
        raise ProbeFailed(
            GvisorStatus.NOT_REGISTERED,
            f"the Docker daemon has no runtime {settings.docker_runtime!r} (registered: "
            f"{', '.join(registered)}); run scripts/deps.sh or see docs/runtime.md",
        )

    try:
        image_id = ensure_probe_image(client, settings.runtime_probe_binary)
    except (OSError, ValueError, *DOCKER_ERRORS) as exc:
        raise ProbeFailed(
            GvisorStatus.PROBE_IMAGE_FAILED, f"cannot build the probe image: {exc}"
        ) from exc

    remove_probe_containers(client, settings.host_id)
    try:
        exit_code, output = _run_probe_container(
            client, image_id, settings=settings, seccomp_profile=seccomp_profile
        )
    except (TimeoutError, *DOCKER_ERRORS) as exc:
        raise ProbeFailed(GvisorStatus.START_FAILED, f"probe container failed: {exc}") from exc
    finally:
        remove_probe_containers(client, settings.host_id)

    kernel = output.strip()[:MAX_DETAIL_OUTPUT]
    if exit_code != 0:
        raise ProbeFailed(
            GvisorStatus.START_FAILED, f"probe container exited with {exit_code}: {kernel!r}"
        )
    try:
        host_kernel = HOST_PROC_VERSION.read_text().strip()
    except OSError as exc:
        raise ProbeFailed(
            GvisorStatus.NOT_GVISOR, f"cannot read {HOST_PROC_VERSION}: {exc.strerror}"
        ) from exc
    if not kernel:
        raise ProbeFailed(GvisorStatus.NOT_GVISOR, "the probe container printed no /proc/version")
    if kernel == host_kernel:
        raise ProbeFailed(
            GvisorStatus.NOT_GVISOR,
            f"the probe container saw the host's kernel ({kernel!r}), so runtime "
            f"{settings.docker_runtime!r} does not run gVisor",
            kernel=kernel,
        )
    return kernel


async def check_runtime(
    docker_adapter: DockerAdapter,
    settings: SupervisorSettings,
    *,
    seccomp_profile: str,
    audit: AuditPublisher,
) -> RuntimeProbeResult:
    """Probe the agents' runtime and report the result in the log, metrics and audit trail.

    Under runsc it first writes the agents' resolv.conf (gvisor_options.py). Raises
    ConfigurationError when that fails, and when --require-gvisor is on and the probe failed,
    after closing `audit` so that the runtime.probed event is stored before the supervisor
    exits.
    """
    if settings.runtime == "runsc":
        try:
            write_resolv_conf(settings)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot write {str(resolv_conf_path(settings))!r} for agents under gVisor: "
                f"{exc.strerror}; check that the folder above --cache-dir is writable"
            ) from exc
    result = await asyncio.to_thread(
        probe_runtime, docker_adapter, settings, seccomp_profile=seccomp_profile
    )

    metrics.GVISOR_AVAILABLE.set(1 if result.gvisor_available else 0)
    metrics.RUNTIME.info(
        {
            "runtime": result.runtime,
            "docker_runtime": result.docker_runtime,
            "gvisor_status": result.status.value,
        }
    )
    if result.gvisor_available:
        outcome = AuditOutcome.SUCCESS
    elif result.status == GvisorStatus.NOT_PROBED:
        outcome = AuditOutcome.INFO
    else:
        outcome = AuditOutcome.FAILURE
    audit.emit(
        "runtime.probed",
        outcome=outcome,
        actor="supervisor",
        reason_code=result.status.value,
        details=result.as_details(),
    )

    if result.gvisor_available:
        logger.info(
            "gVisor runtime %r works: probe saw %r in %.2f s",
            result.docker_runtime,
            result.kernel,
            result.duration,
        )
    elif result.status == GvisorStatus.NOT_PROBED:
        logger.warning(
            "agents run under runc and share the host's kernel; use --runtime=runsc (gVisor) "
            "for untrusted agents"
        )
    elif settings.require_gvisor:
        await audit.close()
        raise ConfigurationError(
            f"--require-gvisor is on but the gVisor probe failed ({result.status.value}): "
            f"{result.detail}; fix the runtime (docs/runtime.md), or start with "
            "--runtime=runc --no-require-gvisor to run agents without gVisor"
        )
    else:
        logger.error(
            "gVisor probe of runtime %r failed (%s): %s; agent starts will likely fail",
            result.docker_runtime,
            result.status.value,
            result.detail,
        )
    return result


def ensure_probe_image(client: docker.DockerClient, binary: Path) -> str:
    """Return the ID of the probe image for `binary`, importing it when missing.

    Raises OSError when the binary cannot be read, ValueError when Docker's import response
    names no image, and a Docker error when the import fails.
    """
    content = binary.read_bytes()
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    existing = client.images.list(filters={"label": f"{LABEL_PROBE_IMAGE}={digest}"})
    if existing:
        return str(existing[0].id)

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        member = tarfile.TarInfo(PROBE_BINARY_PATH.lstrip("/"))
        member.size = len(content)
        member.mode = 0o755
        archive.addfile(member, io.BytesIO(content))
        for folder in ("dev", "proc", "sys", "etc"):
            directory = tarfile.TarInfo(folder)
            directory.type = tarfile.DIRTYPE
            directory.mode = 0o755
            archive.addfile(directory)
    response = client.api.import_image_from_data(
        buffer.getvalue(), changes=[f"LABEL {LABEL_PROBE_IMAGE}={digest}"]
    )
    # The daemon responds with JSON lines and puts the new image's ID in "status".
    for line in str(response).splitlines():
        try:
            image_id = str(json.loads(line).get("status", ""))
        except (ValueError, AttributeError):
            continue
        if image_id.startswith("sha256:"):
            logger.info("imported runtime probe image %s from %s", image_id, binary)
            return image_id
    raise ValueError(f"docker import of {str(binary)!r} returned no image ID: {response!r}")


def remove_probe_containers(client: docker.DockerClient, host_id: str) -> None:
    """Remove this host's probe containers, including ones an interrupted start left."""
    try:
        containers = client.containers.list(
            all=True, filters={"label": f"{LABEL_PROBE_HOST}={host_id}"}
        )
        for container in containers:
            container.remove(force=True)
    except docker.errors.NotFound:
        return
    except DOCKER_ERRORS as exc:
        logger.warning("cannot remove runtime probe containers of %s: %s", host_id, exc)


def _run_probe_container(
    client: docker.DockerClient,
    image_id: str,
    *,
    settings: SupervisorSettings,
    seccomp_profile: str,
) -> tuple[int, str]:
    """Run `cat /proc/version` under the agents' runtime; return the exit code and output."""
    container = client.containers.create(
        image_id,
        command=[PROBE_BINARY_PATH, "cat", "/proc/version"],
        name=f"agent-runner-probe-{settings.host_id}-{uuid.uuid4().hex[:8]}",
        labels={LABEL_PROBE_HOST: settings.host_id},
        user=AGENT_USER,
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true", f"seccomp={seccomp_profile}"],
        network_mode="none",
        mem_limit=int(settings.container_memory_limit),
        memswap_limit=int(settings.container_memory_limit),
        # The agents' process limits: the probe fails where agents could not start either.
        pids_limit=settings.host_pids_limit,
        ulimits=nproc_ulimits(settings),
        runtime=settings.docker_runtime,
        detach=True,
    )
    container.start()
    try:
        status = container.wait(timeout=settings.runtime_probe_timeout)
    except DOCKER_ERRORS as exc:
        raise TimeoutError(
            f"probe container did not exit within {settings.runtime_probe_timeout:g} s: {exc}"
        ) from exc
    output = container.logs(stdout=True, stderr=True).decode(errors="replace")
    return int(status.get("StatusCode", -1)), output
