"""Property-based run of the gateway's OpenAPI schema with schemathesis.

A whole stack runs (nats-server, netguard, supervisor, gateway) with rate limits far above
what the run sends, so every response comes from the route. schemathesis reads the schema
from `/openapi.json` with the stack's key, sends generated requests with that key, and checks
that no response is a 5xx and that each one's status, content type and body are documented.

Generated image URLs must not make the supervisor fetch anything. Its only
`--trusted-image-sources` entry is a file server of this test on loopback, so it rejects
every other URL with `source_not_trusted`, or a malformed one with `url_not_allowed`, before
it resolves a name or opens a connection.
The test checks its log for that and for the absence of any connection attempt.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import trusted_sources
from tests.support.stack import FileServer, Stack, running_stack

pytestmark = pytest.mark.integration

# Examples per API operation and generation mode; with about 15 operations the run stays
# well under a minute.
MAX_EXAMPLES = 40
HIGH_LIMIT = "1000000"
# Log lines of services/supervisor/download.py that only a connection attempt writes.
DOWNLOAD_MARKERS = ("cannot connect to", "following HTTP", "downloaded ")


@pytest.fixture(scope="module")
def local_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    server = FileServer(tmp_path_factory.mktemp("schema-images"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def schema_stack(
    tmp_path_factory: pytest.TempPathFactory, local_source: FileServer
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("schema-stack"),
        network="agent-runner-schema",
        subnet="172.29.21.0/24",
        bridge="ar-schema0",
        supervisor_args=["--agent-start-timeout=10", *trusted_sources(local_source.url(""))],
        api_args=[
            f"--rate-limit={HIGH_LIMIT}",
            f"--rate-limit-burst={HIGH_LIMIT}",
            f"--global-rate-limit={HIGH_LIMIT}",
            f"--global-rate-limit-burst={HIGH_LIMIT}",
            "--start-wait-timeout=15",
        ],
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def api_schema(schema_stack: Stack) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(
        f"{schema_stack.api_url}/openapi.json", headers=schema_stack.headers, timeout=30
    )
    schema.config.update(base_url=schema_stack.api_url)
    return schema


CHECKS = [
    checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


# NOTE: schemathesis.pytest.from_fixture (4.32.5) fails under pytest 9.2 with "'Function' object
# has no attribute '_nodeid'", so each operation runs as a Hypothesis test of its own.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_schema(
    api_schema: schemathesis.BaseSchema, schema_stack: Stack, mode: GenerationMode
) -> None:
    operations = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), f"invalid operation in the schema: {result.err()}"
        operations.append(result.ok())
    statuses: list[int] = []
    without_invalid_input = []
    assert len(operations) >= 10

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case: schemathesis.Case[Any]) -> None:
            response = case.call_and_validate(
                headers=schema_stack.headers, timeout=30, checks=CHECKS
            )
            statuses.append(response.status_code)

        try:
            conforms()
        except Unsatisfiable:
            # An operation without parameters or body, such as GET /v1/agents, has no
            # invalid input to generate.
            if mode is GenerationMode.POSITIVE:
                raise
            without_invalid_input.append(operation.label)

    assert len(statuses) >= 3 * len(operations), statuses
    assert len(without_invalid_input) < len(operations) / 2, without_invalid_input
    assert all(status < 500 for status in statuses)


def test_supervisor_fetched_nothing(schema_stack: Stack, local_source: FileServer) -> None:
    # Runs after the schema test in file order; the starts it caused fail in the background.
    deadline = time.monotonic() + 20
    with httpx.Client(base_url=schema_stack.api_url, headers=schema_stack.headers) as client:
        while True:
            # Redis is shared with other stacks, so only this stack's agents count.
            listed = client.get("/v1/agents").json()["agents"]
            agents = [a for a in listed if a["host_id"] == schema_stack.host_id]
            pending = [a for a in agents if a["state"] not in ("failed", "stopped")]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    log = schema_stack.log_text("supervisor")

    assert agents, "the schema run started no agent"
    assert pending == []
    # Both reasons come from checks that run before any name lookup or connection.
    assert {agent["failure_reason"] for agent in agents} <= {
        "source_not_trusted",
        "url_not_allowed",
    }
    assert "source_not_trusted" in log
    for marker in DOWNLOAD_MARKERS:
        assert marker not in log, marker
    assert not re.search(r"resolv", log, re.IGNORECASE), "the supervisor resolved a host name"
