"""The supervisor's gVisor probe: detection, refusal, and an agent that runs under runsc.

"runsc missing" is a real daemon asked for a runtime name that is not registered
(--runsc-docker-runtime), so detection runs exactly as on a host without gVisor.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Tarball, trusted_sources
from tests.support.images import build_echo_agent_image
from tests.support.signing import make_ecdsa_key, write_public_key
from tests.support.stack import FileServer, Stack, free_port, running_stack

pytestmark = pytest.mark.integration

HOST_PROC_VERSION = Path("/proc/version").read_text().strip()
PROBE_LABEL = "io.agent-runner.runtime-probe-host"
MISSING_RUNTIME = "ar-test-missing-runtime"


def scrape_runtime_metrics(port: int) -> dict[str, dict[str, str] | float]:
    """Return agent_runner_gvisor_available and the labels of agent_runner_runtime_info."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found: dict[str, dict[str, str] | float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "agent_runner_gvisor_available":
                found["available"] = sample.value
            elif sample.name == "agent_runner_runtime_info":
                found["info"] = dict(sample.labels)
    return found


def wait_for_readiness(api: httpx.Client, host_id: str) -> dict[str, Any]:
    """Poll /readyz until it reports `host_id`'s supervisor as ok; return the body."""
    deadline = time.monotonic() + 30
    while True:
        body: dict[str, Any] = api.get("/readyz").json()
        if body.get("supervisors", {}).get(host_id) == "ok":
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz did not report supervisor {host_id} as ok: {body}")
        time.sleep(0.5)


def probe_events(stack: Stack) -> list[dict[str, object]]:
    return [event for event in stack.audit_events() if event["type"] == "runtime.probed"]


def assert_no_probe_containers(client: docker.DockerClient, host_id: str) -> None:
    left = client.containers.list(all=True, filters={"label": f"{PROBE_LABEL}={host_id}"})
    assert left == []


@pytest.fixture
def bare_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack object with only its NATS server running; tests start the supervisor."""
    stack = Stack(
        workdir=tmp_path / "stack",
        netguard=False,
        network="ar-runtime-probe",
        subnet="172.29.41.0/24",
        bridge="ar-rtprobe0",
    )
    stack.workdir.mkdir(parents=True)
    try:
        stack.start_nats()
        yield stack
    finally:
        stack.close()


def test_production_refuses_without_gvisor(
    bare_stack: Stack, docker_client: docker.DockerClient
) -> None:
    bare_stack.profile = "production"
    key = write_public_key(make_ecdsa_key(), bare_stack.workdir / "signing.pub")

    with pytest.raises(RuntimeError, match="exited with status 1"):
        bare_stack.start_supervisor(
            [
                f"--image-signing-key={key}",
                "--runtime=runsc",
                # The production default, which the stack turns off for runc test runs.
                "--require-gvisor",
                f"--runsc-docker-runtime={MISSING_RUNTIME}",
            ]
        )

    log = bare_stack.log_text("supervisor")
    assert "--require-gvisor is on but the gVisor probe failed (not_registered)" in log
    assert f"no runtime '{MISSING_RUNTIME}'" in log
    assert "supervisor cannot run" in log
    events = probe_events(bare_stack)
    assert len(events) == 1
    assert events[0]["outcome"] == "failure"
    assert events[0]["reason_code"] == "not_registered"
    assert_no_probe_containers(docker_client, bare_stack.host_id)


def test_production_rejects_runc_with_require_gvisor(bare_stack: Stack) -> None:
    bare_stack.profile = "production"

    with pytest.raises(RuntimeError, match="exited with status 2"):
        bare_stack.start_supervisor(["--runtime=runc", "--require-gvisor"])

    log = bare_stack.log_text("supervisor")
    assert "--require-gvisor is on but --runtime is 'runc'" in log


def test_development_reports_missing_gvisor(
    bare_stack: Stack, docker_client: docker.DockerClient
) -> None:
    metrics_port = free_port()

    bare_stack.start_supervisor(
        [
            "--runtime=runsc",
            f"--runsc-docker-runtime={MISSING_RUNTIME}",
            f"--metrics-port={metrics_port}",
        ]
    )

    metrics = scrape_runtime_metrics(metrics_port)
    assert metrics["available"] == 0
    assert metrics["info"] == {
        "runtime": "runsc",
        "docker_runtime": MISSING_RUNTIME,
        "gvisor_status": "not_registered",
    }
    events = probe_events(bare_stack)
    assert len(events) == 1
    assert events[0]["outcome"] == "failure"
    assert events[0]["reason_code"] == "not_registered"
    assert "gVisor probe of runtime" in bare_stack.log_text("supervisor")
    assert_no_probe_containers(docker_client, bare_stack.host_id)


@pytest.fixture(scope="module")
def runsc_echo_tarball(docker_client: docker.DockerClient, served: FileServer) -> Iterator[Tarball]:
    from tests.integration.conftest import make_tarball

    image_id = build_echo_agent_image(docker_client)
    tarball = make_tarball(docker_client, served, image_id, f"runsc-echo-{uuid.uuid4().hex}.tar")
    yield tarball
    tarball.path.unlink(missing_ok=True)
    # The stack loaded it again from the tarball under the same ID.
    with contextlib.suppress(docker.errors.NotFound):
        docker_client.images.remove(image_id, force=True)


def test_agent_runs_under_gvisor(
    tmp_path: Path,
    served: FileServer,
    runsc_echo_tarball: Tarball,
    docker_client: docker.DockerClient,
) -> None:
    metrics_port = free_port()
    with running_stack(
        tmp_path / "stack",
        supervisor_args=[
            "--runtime=runsc",
            f"--metrics-port={metrics_port}",
            "--agent-stop-grace=2",
            *trusted_sources(served.url("")),
        ],
        network="ar-runtime-agent",
        subnet="172.29.40.0/24",
        bridge="ar-rtagent0",
    ) as stack:
        metrics = scrape_runtime_metrics(metrics_port)
        assert metrics["available"] == 1
        assert metrics["info"] == {
            "runtime": "runsc",
            "docker_runtime": "runsc",
            "gvisor_status": "available",
        }
        events = probe_events(stack)
        assert len(events) == 1
        assert events[0]["outcome"] == "success"
        assert events[0]["details"]["kernel"] != HOST_PROC_VERSION  # type: ignore[index]
        assert_no_probe_containers(docker_client, stack.host_id)

        with httpx.Client(base_url=stack.api_url, headers=stack.headers, timeout=60) as api:
            readiness = wait_for_readiness(api, stack.host_id)
            assert readiness["runtimes"][stack.host_id] == {
                "runtime": "runsc",
                "gvisor_status": "available",
            }

            response = api.post(
                "/v1/agents",
                params={"wait": "true"},
                json={
                    "image_url": runsc_echo_tarball.url,
                    "image_digest": runsc_echo_tarball.digest,
                },
            )
            assert response.status_code == 202, response.text
            agent = response.json()
            assert agent["state"] == "ready", agent

            reply = api.post(
                f"/v1/agents/{agent['agent_id']}/http/cgi-bin/echo", content=b"under gvisor"
            )
            assert reply.status_code == 200
            assert "under gvisor" in reply.text

            container = docker_client.containers.get(agent["container_id"])
            assert container.attrs["HostConfig"]["Runtime"] == "runsc"
            kernel = container.exec_run(["cat", "/proc/version"]).output.decode().strip()
            assert kernel
            assert kernel != HOST_PROC_VERSION
            # Docker's embedded DNS does not respond under gVisor, so the agent queries the gateway.
            resolv_conf = container.exec_run(["cat", "/etc/resolv.conf"]).output.decode()
            assert "nameserver 172.29.40.1\n" in resolv_conf
            assert "127.0.0.11" not in resolv_conf

            stopped = api.delete(f"/v1/agents/{agent['agent_id']}")
            assert stopped.status_code == 200
            assert stopped.json()["state"] == "stopped"
