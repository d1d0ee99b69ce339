"""`/readyz` of a full stack: firewall, supervisor and proxy state as the services publish it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.stack import Stack, running_stack

pytestmark = pytest.mark.integration

SUBNET = "172.29.20.0/24"


@pytest.fixture(scope="module")
def full_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("readiness"),
        network="agent-runner-ready",
        subnet=SUBNET,
        bridge="ar-ready0",
        proxy=True,
    ) as stack:
        yield stack


def readiness_until(api: httpx.Client, predicate: Any, *, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = api.get("/readyz")
        if predicate(response) or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def test_readiness_reports_every_service(full_stack: Stack) -> None:
    host = full_stack.host_id
    with httpx.Client(base_url=full_stack.api_url, headers=full_stack.headers, timeout=30) as api:
        response = readiness_until(
            api, lambda r: r.status_code == 200 and r.json()["proxies"].get(host) == "running"
        )
        anonymous = httpx.get(f"{full_stack.api_url}/readyz", timeout=30)

    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "ready"
    assert body["nats"] == "ok"
    assert body["redis"] == "ok"
    assert body["rate_limiter"] == "redis"
    assert body["firewall"][host] == "verified"
    assert body["supervisors"][host] == "ok"
    assert body["proxies"][host] == "running"
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"


def test_stopped_proxy_reported_but_not_required(full_stack: Stack) -> None:
    host = full_stack.host_id
    assert full_stack.stop_service("proxy") == 0
    try:
        with httpx.Client(
            base_url=full_stack.api_url, headers=full_stack.headers, timeout=30
        ) as api:
            response = readiness_until(api, lambda r: r.json()["proxies"].get(host) == "stopped")
    finally:
        full_stack.start_proxy()

    assert response.json()["proxies"][host] == "stopped"
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_stopped_supervisor_not_ready(full_stack: Stack) -> None:
    host = full_stack.host_id
    assert full_stack.stop_service("supervisor") == 0
    try:
        with httpx.Client(
            base_url=full_stack.api_url, headers=full_stack.headers, timeout=30
        ) as api:
            down = api.get("/readyz")
    finally:
        full_stack.start_supervisor()
    with httpx.Client(base_url=full_stack.api_url, headers=full_stack.headers, timeout=30) as api:
        back = readiness_until(api, lambda r: r.status_code == 200)

    assert down.status_code == 503
    assert down.json()["status"] == "not_ready"
    assert down.json()["supervisors"][host] == "down"
    assert down.json()["firewall"][host] == "verified"
    assert back.status_code == 200
    assert back.json()["supervisors"][host] == "ok"
