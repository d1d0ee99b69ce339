"""`schemathesis run` against the gateway's OpenAPI schema on a whole local stack.

A stack runs (nats-server, netguard, supervisor, gateway) on a Redis server of its own, with
rate limits far above what the run sends, so every response comes from the route. The agent
store is private so that the run's stateful phase, which reuses agent IDs from
`GET /v1/agents`, never reaches the agents of other stacks in the shared Redis. An echo agent
runs before the run starts, so the agent routes and the passthrough reach their success paths.
The schemathesis CLI reads the schema from `/openapi.json` with the stack's key and sends
generated positive and negative requests with that key. It fails on any 5xx from the gateway,
on an undocumented status or content type, and on a body or header that does not match the
schema. Further runs check that an undocumented status, a gateway timeout on the passthrough
and a Redis outage are caught or documented.

The test runs the CLI in a subprocess because `schemathesis.pytest.from_fixture` (4.32.5)
reads `Function._nodeid`, which pytest 9.2 no longer has.

Generated image URLs must not make the supervisor fetch anything. Its only
`--trusted-image-sources` entry is a file server of this test on loopback, so it rejects
every other URL with `source_not_trusted`, or a malformed one with `url_not_allowed`, before
it resolves a name or opens a connection.
The test checks its log for that and for the absence of any connection attempt.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import httpx
import pytest

from tests.integration.conftest import Tarball, trusted_sources
from tests.support import schemathesis_checks
from tests.support.redis_server import RedisServer
from tests.support.stack import VENV_BIN, FileServer, Stack, running_stack

pytestmark = pytest.mark.integration

SCHEMATHESIS = VENV_BIN / "schemathesis"
HOOKS_FILE = Path(schemathesis_checks.__file__)
CHECKS = (
    "not_a_server_error",
    "no_gateway_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
# Test cases per API operation and generation phase. With these values a full run sent about
# 1,000 requests in 10 to 30 s on a shared 2-CPU machine, and RUN_TIMEOUT ends a stalled one.
MAX_EXAMPLES = 40
SEED = 6
RUN_TIMEOUT = 150.0
REQUEST_TIMEOUT = 30.0
# The key reaches schemathesis through its config file and the environment, not its argv.
KEY_VARIABLE = "AGENT_RUNNER_SCHEMA_API_KEY"
HIGH_LIMIT = "1000000"
# Seconds the gateway waits for an agent before it returns 504 agent_timeout.
AGENT_TIMEOUT = 3.0
# Messages of services/supervisor/download.py that only a connection attempt logs, each with
# the URL or origin it connected to.
CONNECTION_MESSAGES = re.compile(
    r"cannot connect to (\S+)"
    r"|following HTTP \d+ redirect from (\S+)"
    r"|downloaded \d+ bytes from (\S+)"
)


@dataclass(frozen=True)
class EchoAgent:
    """The agent started before the schema run, from the module's trusted file server."""

    agent_id: str
    image_url: str
    image_digest: str


@dataclass(frozen=True)
class SchemaRun:
    """Outcome of one `schemathesis run`: exit code, console output and reports."""

    returncode: int
    output: str
    report: dict[str, Any]
    har_entries: list[dict[str, Any]]


@pytest.fixture(scope="module")
def local_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    server = FileServer(tmp_path_factory.mktemp("schema-images"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("schema-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def schema_stack(
    tmp_path_factory: pytest.TempPathFactory, local_source: FileServer, private_redis: RedisServer
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("schema-stack"),
        network="agent-runner-schema",
        subnet="172.29.21.0/24",
        bridge="ar-schema0",
        supervisor_args=[
            *private_redis.flags,
            "--agent-start-timeout=10",
            *trusted_sources(local_source.url("")),
        ],
        api_args=[
            *private_redis.flags,
            f"--rate-limit={HIGH_LIMIT}",
            f"--rate-limit-burst={HIGH_LIMIT}",
            f"--global-rate-limit={HIGH_LIMIT}",
            f"--global-rate-limit-burst={HIGH_LIMIT}",
            "--start-wait-timeout=15",
            f"--request-timeout={AGENT_TIMEOUT:g}",
        ],
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def echo_agent(schema_stack: Stack, local_source: FileServer, echo_tarball: Tarball) -> EchoAgent:
    """Start the echo agent so that the run reaches the success paths of agent routes.

    schemathesis learns its ID from `GET /v1/agents` and from responses of other operations.
    """
    shutil.copyfile(echo_tarball.path, local_source.directory / "echo.tar")
    return start_echo_agent(schema_stack, local_source.url("echo.tar"), echo_tarball.digest)


def start_echo_agent(stack: Stack, image_url: str, image_digest: str) -> EchoAgent:
    response = httpx.post(
        f"{stack.api_url}/v1/agents",
        params={"wait": "true"},
        json={"image_url": image_url, "image_digest": image_digest},
        headers=stack.headers,
        timeout=60,
    )
    assert response.status_code == 202, response.text
    agent = response.json()
    assert agent["state"] == "ready", agent
    return EchoAgent(
        agent_id=agent["agent_id"], image_url=agent["image_url"], image_digest=agent["image_digest"]
    )


def schemathesis_config(checks: Sequence[str], path_parameters: Mapping[str, str]) -> str:
    """Return a schemathesis.toml that enables only `checks` and sends the stack's key.

    A passthrough 5xx may be the agent's own, so there `no_gateway_server_error` replaces
    `not_a_server_error`. `path_parameters` fixes those parameters in every request.
    """
    lines = [
        f"hooks = {json.dumps(str(HOOKS_FILE))}",
        f'headers = {{ "X-API-Key" = "${{{KEY_VARIABLE}}}" }}',
        "",
        "[parameters]",
        *(f'"path.{name}" = {json.dumps(value)}' for name, value in path_parameters.items()),
        "",
        "[checks]",
        "enabled = false",
        *(f"{check}.enabled = true" for check in checks),
        "",
        "[[operations]]",
        f'include-operation-id-regex = "^{schemathesis_checks.PASSTHROUGH_OPERATION_PREFIX}"',
        "checks.not_a_server_error.enabled = false",
    ]
    return "\n".join(lines) + "\n"


def run_schemathesis(
    stack: Stack,
    workdir: Path,
    location: str,
    *options: str,
    checks: Sequence[str] = CHECKS,
    path_parameters: Mapping[str, str] | None = None,
) -> SchemaRun:
    """Run the schemathesis CLI against `stack` only, and read its JSON and HAR reports.

    `location` is the schema's URL or file. `--url` pins the base URL to the stack's gateway
    whatever `servers` the schema lists.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(schemathesis_config(checks, path_parameters or {}))
    report_json = workdir / "report.json"
    report_har = workdir / "report.har"
    command = [
        str(SCHEMATHESIS),
        f"--config-file={config}",
        "--no-color",
        "run",
        location,
        f"--url={stack.api_url}",
        f"--max-examples={MAX_EXAMPLES}",
        f"--seed={SEED}",
        "--workers=1",
        f"--request-timeout={REQUEST_TIMEOUT:g}",
        "--generation-database=none",
        "--report=json,har",
        f"--report-json-path={report_json}",
        f"--report-har-path={report_har}",
        *options,
    ]

    # The working directory takes the .hypothesis and .schemathesis folders the CLI writes.
    result = subprocess.run(
        command,
        cwd=workdir,
        env={**os.environ, KEY_VARIABLE: stack.api_key},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )

    output = result.stdout + result.stderr
    assert report_json.exists(), f"schemathesis wrote no report:\n{output[-4000:]}"
    return SchemaRun(
        returncode=result.returncode,
        output=output,
        report=json.loads(report_json.read_text()),
        har_entries=json.loads(report_har.read_text())["log"]["entries"],
    )


def response_body(entry: dict[str, Any]) -> bytes:
    """Return the response body of a HAR entry."""
    content = entry["response"]["content"]
    text: str = content.get("text", "")
    return base64.b64decode(text) if content.get("encoding") == "base64" else text.encode()


def is_relayed(entry: dict[str, Any]) -> bool:
    """Tell whether a HAR entry's response came from an agent through the passthrough."""
    path = urlsplit(entry["request"]["url"]).path
    from_passthrough = re.fullmatch(r"/v1/agents/[^/]+/http/.*", path) is not None
    return from_passthrough and schemathesis_checks.gateway_error_code(response_body(entry)) is None


def test_api_conforms_to_schema(schema_stack: Stack, echo_agent: EchoAgent, tmp_path: Path) -> None:
    run = run_schemathesis(schema_stack, tmp_path, f"{schema_stack.api_url}/openapi.json")
    report = run.report
    operations = report["operations"]
    phases = {name: phase["status"] for name, phase in report["phases"].items()}
    statuses = Counter(entry["response"]["status"] for entry in run.har_entries)
    # The passthrough relays the agent's own 5xx, such as 501 for a method it does not serve.
    gateway_server_errors = [
        (entry["request"]["method"], entry["request"]["url"], entry["response"]["status"])
        for entry in run.har_entries
        if entry["response"]["status"] >= 500 and not is_relayed(entry)
    ]
    unauthenticated = [
        entry["request"]["url"]
        for entry in run.har_entries
        if "x-api-key" not in {header["name"].lower() for header in entry["request"]["headers"]}
    ]

    assert run.returncode == 0, run.output[-8000:]
    assert report["complete"] is True
    assert report["failures"] == []
    assert report["errors"] == []
    assert operations["total"] >= 10
    assert operations["tested"] == operations["total"], operations
    # The schema declares no examples, so schemathesis skips its examples phase.
    assert phases["coverage"] == "success", phases
    assert phases["fuzzing"] == "success", phases
    assert phases["stateful"] == "success", phases
    assert report["test_cases"]["generated"] >= 10 * operations["total"]
    assert len(run.har_entries) >= 10 * operations["total"]
    assert unauthenticated == []
    # Every request passed authentication, and some reached a route's success path.
    assert 401 not in statuses, statuses
    assert any(200 <= status < 300 for status in statuses), statuses
    assert any(is_relayed(entry) for entry in run.har_entries), "no request reached the agent"
    assert gateway_server_errors == []


def test_schema_run_fails_on_undocumented_status(schema_stack: Stack, tmp_path: Path) -> None:
    schema = httpx.get(
        f"{schema_stack.api_url}/openapi.json", headers=schema_stack.headers, timeout=30
    ).json()
    # Random agent IDs get 404 from this route, which the edited schema no longer documents.
    del schema["paths"]["/v1/agents/{agent_id}"]["get"]["responses"]["404"]
    edited = tmp_path / "openapi.json"
    edited.write_text(json.dumps(schema))

    run = run_schemathesis(
        schema_stack, tmp_path, str(edited), "--include-name=GET /v1/agents/{agent_id}"
    )

    assert run.returncode == 1, run.output[-8000:]
    assert run.report["operations"]["tested"] == 1
    assert "Undocumented status code" in run.output
    assert {failure["code"] for failure in run.report["failures"]} == {"ST103"}


def test_supervisor_fetched_nothing(
    schema_stack: Stack, local_source: FileServer, echo_agent: EchoAgent
) -> None:
    # Runs after the schema run in file order and waits for the agent starts it caused to fail.
    # schemathesis also reuses the echo agent's image URL and digest from responses. Its URL
    # is trusted, and the supervisor starts a cached digest without fetching any URL.
    trusted_origin = local_source.url("").rstrip("/")
    deadline = time.monotonic() + 20
    with httpx.Client(base_url=schema_stack.api_url, headers=schema_stack.headers) as client:
        while True:
            listed = client.get("/v1/agents").json()["agents"]
            agents = [
                a
                for a in listed
                if not a["image_url"].startswith(trusted_origin)
                and a["image_digest"] != echo_agent.image_digest
            ]
            pending = [a for a in agents if a["state"] not in ("failed", "stopped")]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    log = schema_stack.log_text("supervisor")
    contacted = {
        next(group for group in match.groups() if group)
        for match in CONNECTION_MESSAGES.finditer(log)
    }

    assert any(a["agent_id"] == echo_agent.agent_id for a in listed)
    assert agents, "the schema run started no agent from a generated URL"
    assert pending == []
    # Both reasons come from checks that run before any name lookup or connection.
    assert {agent["failure_reason"] for agent in agents} <= {
        "source_not_trusted",
        "url_not_allowed",
    }
    assert "source_not_trusted" in log
    assert contacted, "the echo agent's download is missing from the supervisor log"
    assert {url for url in contacted if not url.startswith(trusted_origin)} == set()
    assert not re.search(r"resolv", log, re.IGNORECASE), "the supervisor resolved a host name"


def test_schema_run_fails_on_gateway_timeout(
    schema_stack: Stack, echo_agent: EchoAgent, tmp_path: Path
) -> None:
    # The schema run may have stopped the first echo agent, so this test starts its own.
    agent = start_echo_agent(schema_stack, echo_agent.image_url, echo_agent.image_digest)
    client = docker.from_env()
    container = client.containers.get(f"agent-runner-{agent.agent_id}")

    # A paused agent accepts no request, so the gateway itself returns 504 agent_timeout,
    # a documented status that only no_gateway_server_error rejects.
    container.pause()
    try:
        run = run_schemathesis(
            schema_stack,
            tmp_path,
            f"{schema_stack.api_url}/openapi.json",
            "--include-operation-id=passthrough_get",
            "--phases=fuzzing",
            "--max-examples=3",
            "--max-failures=1",
            path_parameters={"agent_id": agent.agent_id},
        )
    finally:
        container.unpause()
        client.close()

    assert run.returncode == 1, run.output[-8000:]
    assert "the gateway returned 504 'agent_timeout'" in run.output
    assert [entry["response"]["status"] for entry in run.har_entries][:1] == [504]


def test_store_outage_responses_documented(
    schema_stack: Stack, private_redis: RedisServer, tmp_path: Path
) -> None:
    # Runs last in file order because the stack keeps no agent store after this.
    private_redis.stop()
    conformance = [check for check in CHECKS if check.endswith("_conformance")]

    # Almost every request fails alike without Redis, so fewer examples cover the same responses.
    run = run_schemathesis(
        schema_stack,
        tmp_path,
        f"{schema_stack.api_url}/openapi.json",
        "--phases=coverage,fuzzing",
        "--max-examples=10",
        checks=conformance,
    )
    statuses = Counter(entry["response"]["status"] for entry in run.har_entries)

    assert run.returncode == 0, run.output[-8000:]
    assert run.report["failures"] == []
    assert run.report["operations"]["tested"] == run.report["operations"]["total"]
    # Without Redis every route but /healthz and /readyz returns 503 store_unavailable.
    assert statuses[503] >= run.report["operations"]["total"], statuses
    assert "Redis failed on" in schema_stack.log_text("api")
