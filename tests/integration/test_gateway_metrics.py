"""Prometheus metrics of the real gateway: behind their own key, or on their own listener.

Each test starts `agent-runner-api` with its own nats-server and no supervisor, through the
gateway helper of test_gateway_limits.py, so requests cross a real socket and the rate-limit
buckets live in the shared Redis under the stack's own prefix.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.api.errors import UNAUTHORIZED_MESSAGE
from tests.integration.test_gateway_limits import AUTH_FAILURE_BURST, Gateway, gateway
from tests.support.stack import Stack, free_port

pytestmark = pytest.mark.integration

METRICS_KEY = secrets.token_urlsafe(32)
UNKNOWN_AGENT = "/v1/agents/ag-" + "0" * 32


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Return every sample of a Prometheus text page, keyed by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.json()["error"]["message"] == UNAUTHORIZED_MESSAGE


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[Stack]:
    """A gateway that serves /metrics on its own port to METRICS_KEY."""
    with gateway(tmp_path / "keyed", f"--metrics-api-key={METRICS_KEY}") as running:
        yield running.stack


@pytest.fixture
def keyed_roomy(tmp_path: Path) -> Iterator[Stack]:
    """A gateway like `keyed` whose address may fail to authenticate many times."""
    with gateway(
        tmp_path / "keyed-roomy",
        f"--metrics-api-key={METRICS_KEY}",
        "--auth-failure-rate-limit-burst=1000",
    ) as running:
        yield running.stack


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    """A gateway that serves metrics on a listener of their own, without a key."""
    address = f"127.0.0.1:{free_port()}"
    with gateway(tmp_path / "bound", f"--metrics-bind={address}") as running:
        yield running.stack, f"http://{address}"


@pytest.fixture
def unconfigured(tmp_path: Path) -> Iterator[Gateway]:
    with gateway(tmp_path / "unconfigured") as running:
        yield running


def test_metrics_need_metrics_key(keyed_roomy: Stack) -> None:
    keyed = keyed_roomy
    with httpx.Client(base_url=keyed.api_url, timeout=30) as client:
        anonymous = client.get("/metrics")
        wrong = client.get("/metrics", headers={"X-Metrics-Key": "x" * 43})
        wrong_bearer = client.get("/metrics", headers={"Authorization": "Bearer " + "x" * 43})
        api_key = client.get("/metrics", headers=keyed.headers)
        api_key_as_metrics_key = client.get("/metrics", headers={"X-Metrics-Key": keyed.api_key})
        metrics_key_elsewhere = client.get("/v1/agents", headers={"X-Metrics-Key": METRICS_KEY})
        by_header = client.get("/metrics", headers={"X-Metrics-Key": METRICS_KEY})
        by_bearer = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})

    assert_unauthorized(anonymous)
    assert_unauthorized(wrong)
    assert_unauthorized(wrong_bearer)
    assert api_key.status_code == 404
    assert api_key.json()["error"]["code"] == "not_found"
    assert_unauthorized(api_key_as_metrics_key)
    assert_unauthorized(metrics_key_elsewhere)
    assert by_header.status_code == 200
    assert by_header.headers["content-type"].startswith("text/plain")
    assert "agent_runner_api_requests_total" in by_header.text
    assert by_bearer.status_code == 200
    assert METRICS_KEY not in keyed.log_text("api")


def test_counters_follow_requests(keyed: Stack) -> None:
    metrics_headers = {"X-Metrics-Key": METRICS_KEY}
    with httpx.Client(base_url=keyed.api_url, timeout=30) as client:
        before = samples(client.get("/metrics", headers=metrics_headers).text)
        not_found = [client.get(UNKNOWN_AGENT, headers=keyed.headers) for _ in range(3)]
        listed = client.get("/v1/agents", headers=keyed.headers)
        missing = client.get(UNKNOWN_AGENT)
        invalid = [
            client.get(f"/v1/agents/ag-{n:032x}", headers={"X-API-Key": "ar_wrong"})
            for n in range(AUTH_FAILURE_BURST - 1)
        ]
        limited = client.get(UNKNOWN_AGENT, headers={"X-API-Key": "ar_wrong"})
        unmatched = client.get("/no/such/path/" + "x" * 20, headers=keyed.headers)
        after = samples(client.get("/metrics", headers=metrics_headers).text)

    assert [response.status_code for response in not_found] == [404] * 3
    assert listed.status_code == 200
    assert missing.status_code == 401
    assert [response.status_code for response in invalid] == [401] * (AUTH_FAILURE_BURST - 1)
    assert limited.status_code == 429
    assert unmatched.status_code in (401, 429, 404)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "agent_runner_api_requests_total"
    template = "/v1/agents/{agent_id}"
    # Three 404s with the key, then AUTH_FAILURE_BURST 401s (one missing key, the rest
    # invalid) and one 429 without a valid key.
    assert moved(requests, route=template, status_class="4xx") == 3 + AUTH_FAILURE_BURST + 1
    assert moved(requests, route="/v1/agents", status_class="2xx") == 1
    assert moved(requests, route="unmatched", status_class="4xx") == 1
    assert not any("/no/such/path" in str(labels) for _, labels in after)
    assert not any("ag-0000" in str(labels) for _, labels in after)
    failures = "agent_runner_api_auth_failures_total"
    assert moved(failures, reason="missing_key") == 1
    assert moved(failures, reason="invalid_key") == AUTH_FAILURE_BURST - 1
    assert moved("agent_runner_api_rate_limited_total", bucket="auth-failures") >= 1
    assert any(name == "agent_runner_agents" for name, _ in after)


def test_metrics_only_on_bind_address(bound: tuple[Stack, str]) -> None:
    stack, metrics_url = bound
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        on_gateway_anonymous = client.get("/metrics")
        on_gateway_keyed = client.get("/metrics", headers=stack.headers)
    with httpx.Client(base_url=metrics_url, timeout=30) as client:
        scraped = client.get("/metrics")
        agents = client.get("/v1/agents", headers=stack.headers)
        health = client.get("/healthz")
        posted = client.post("/metrics")

    assert_unauthorized(on_gateway_anonymous)
    assert on_gateway_keyed.status_code == 404
    assert scraped.status_code == 200
    assert "agent_runner_api_requests_total" in scraped.text
    assert agents.status_code == 404
    assert health.status_code == 404
    assert posted.status_code == 404


def test_no_metrics_without_configuration(unconfigured: Gateway) -> None:
    stack = unconfigured.stack
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        anonymous = client.get("/metrics")
        keyed = client.get("/metrics", headers=stack.headers)
        with_metrics_header = client.get("/metrics", headers={"X-Metrics-Key": METRICS_KEY})

    assert_unauthorized(anonymous)
    assert keyed.status_code == 404
    assert_unauthorized(with_metrics_header)
