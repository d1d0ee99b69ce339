"""Tests that every gateway error, expected or not, is a JSON body with a fixed code."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from libs.common import logs


def test_api_error_uses_its_status_and_code(client: TestClient) -> None:
    response = client.get("/conflict", headers={"X-Request-ID": "req-409"})

    assert response.status_code == 409
    assert response.json() == {
        "error": {"code": "agent_not_running", "message": "agent ag-1 is not running"},
        "request_id": "req-409",
    }


def test_unexpected_exception_is_internal_error(client: TestClient) -> None:
    response = client.get("/crash")

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"


def test_internal_error_hides_exception(client: TestClient) -> None:
    response = client.get("/crash")

    assert "unexpected failure" not in response.text
    assert "RuntimeError" not in response.text


def test_internal_error_keeps_request_id(client: TestClient) -> None:
    response = client.get("/crash", headers={"X-Request-ID": "req-500"})

    assert response.headers["x-request-id"] == "req-500"
    assert response.json()["request_id"] == "req-500"


class BoundCorrelationId(logging.Filter):
    """Store the correlation id bound when a record is written, as the JSON log does."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.bound_correlation_id = logs.current_correlation_id()
        return True


def test_internal_error_logged_with_request_id(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(BoundCorrelationId())

    with caplog.at_level(logging.ERROR, logger="services.api.errors"):
        client.get("/crash", headers={"X-Request-ID": "req-500"})

    assert "GET /crash" in caplog.records[0].getMessage()
    assert caplog.records[0].exc_info is not None
    assert caplog.records[0].__dict__["bound_correlation_id"] == "req-500"


def test_unknown_route_is_not_found(client: TestClient) -> None:
    response = client.get("/no-such-route", headers={"X-Request-ID": "req-404"})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert response.json()["request_id"] == "req-404"


def test_wrong_method_is_method_not_allowed(client: TestClient) -> None:
    response = client.delete("/conflict")

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_invalid_parameter_is_invalid_request(client: TestClient) -> None:
    response = client.get("/items/seven")

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert response.json()["error"]["details"][0]["location"] == ["path", "number"]


def test_error_response_is_json(client: TestClient) -> None:
    response = client.get("/no-such-route")

    assert response.headers["content-type"] == "application/json"
