"""Every route of the gateway application needs an API key, except /healthz.

The routes come from the application object itself (`app.routes`, with included routers
expanded), so a route added later is checked without editing this test. The requests go to a
real gateway process started from the same code, with its own nats-server and no supervisor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route

from libs.common.settings import load_settings
from services.api.app import create_app
from services.api.auth import KeyRing
from services.api.errors import UNAUTHORIZED_MESSAGE
from services.api.metrics import leaf_routes
from services.api.routes import PASSTHROUGH_METHODS
from services.api.settings import ApiSettings
from tests.integration.test_gateway_limits import gateway
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

PATH_VALUES = {"agent_id": "ag-" + "0" * 32, "path": "some/agent/path"}
WRONG_CREDENTIALS = [
    {"X-API-Key": "ar_wrong"},
    {"Authorization": "Bearer ar_wrong"},
    {"X-API-Key": ""},
    {"Authorization": "Basic dGVzdHM6c2VjcmV0"},
]


def application_routes() -> list[tuple[str, str]]:
    """Return (method, path template) for every method of every route of the gateway app."""
    settings = load_settings(ApiSettings, [])
    app = create_app(settings, keyring=KeyRing.load(key_file=None, plain_keys="unused"))
    routes: list[tuple[str, str]] = []
    for route in leaf_routes(app.routes):
        # A Mount or a WebSocket route would need its own check; the gateway has none.
        assert isinstance(route, APIRoute | Route), f"unexpected route type {route!r}"
        assert route.methods, f"route {route.path} has no methods"
        routes.extend((method, route.path) for method in sorted(route.methods))
    return routes


def concrete_path(template: str) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda match: PATH_VALUES[match.group(1)], template)


@pytest.fixture
def roomy(tmp_path: Path) -> Iterator[Stack]:
    """A gateway whose client address may fail to authenticate many times."""
    with gateway(
        tmp_path / "routes", "--rate-limit-burst=1000", "--auth-failure-rate-limit-burst=1000"
    ) as running:
        yield running.stack


def test_route_list_covers_every_method() -> None:
    routes = application_routes()

    for method in PASSTHROUGH_METHODS:
        assert (method, "/v1/agents/{agent_id}/http/{path:path}") in routes
    for expected in [
        ("POST", "/v1/agents"),
        ("GET", "/v1/agents"),
        ("GET", "/v1/agents/{agent_id}"),
        ("DELETE", "/v1/agents/{agent_id}"),
        ("GET", "/v1/agents/{agent_id}/logs"),
        ("POST", "/v1/cache/purge"),
        ("GET", "/readyz"),
        ("GET", "/openapi.json"),
        ("GET", "/healthz"),
    ]:
        assert expected in routes


def test_every_route_rejects_missing_and_wrong_key(roomy: Stack) -> None:
    routes = application_routes()
    checked = []

    with httpx.Client(base_url=roomy.api_url, timeout=30) as client:
        for method, template in routes:
            url = concrete_path(template)
            if template == "/healthz":
                assert client.request(method, url).status_code == 200
                continue
            responses = [client.request(method, url)]
            responses += [client.request(method, url, headers=h) for h in WRONG_CREDENTIALS]
            for response in responses:
                assert response.status_code == 401, (method, url, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
            if method != "HEAD":
                bodies = [response.json() for response in responses]
                errors = [body["error"] for body in bodies]
                assert errors == [{"code": "unauthorized", "message": UNAUTHORIZED_MESSAGE}] * len(
                    responses
                ), (method, url)
                assert all(set(body) == {"error", "request_id"} for body in bodies)
            checked.append((method, template))

    assert len(checked) == len(routes) - 1


def test_every_route_rejects_unknown_query(roomy: Stack) -> None:
    routes = [
        (method, template)
        for method, template in application_routes()
        if "/http/" not in template and method != "HEAD"
    ]
    checked = []

    with httpx.Client(base_url=roomy.api_url, headers=roomy.headers, timeout=30) as client:
        for method, template in routes:
            response = client.request(
                method, concrete_path(template), params={"unknown_parameter": "1"}
            )

            assert response.status_code == 422, (method, template, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_request", (method, template)
            assert "unknown query parameter 'unknown_parameter'" in error["message"]
            checked.append((method, template))

    assert ("GET", "/healthz") in checked
    assert ("GET", "/v1/agents/{agent_id}") in checked


def test_start_event_names_key_ids_never_keys(roomy: Stack) -> None:
    started = [
        event
        for event in roomy.audit_events()
        if event["service"] == "api" and event["type"] == "service.started"
    ]

    assert started, "the gateway published no service.started event"
    details = started[-1]["details"]
    assert details["api_key_ids"] == ["tests"]
    assert details["api_keys"] == 1
    assert roomy.api_key not in str(started)
