"""Errors of the gateway and their JSON form.

Every error response has the body `{"error": {"code": ..., "message": ...}, "request_id": ...}`
with a stable `code` that clients can branch on; the message is for people.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from libs.common import logs
from libs.common.errors import StoreError

logger = logging.getLogger(__name__)

UNAUTHORIZED_MESSAGE = (
    "missing or invalid API key; send it in the X-API-Key header or as Authorization: Bearer"
)


class ErrorDetail(BaseModel):
    """The `error` object of an error response."""

    code: str = Field(description="Stable error code that clients can branch on.")
    message: str = Field(description="What failed and what to do, for people.")
    details: Any = Field(None, description="Per-field problems of a 422 response.")


class ErrorBody(BaseModel):
    """The body of every error response, as documented in the OpenAPI schema."""

    error: ErrorDetail
    request_id: str | None = Field(description="The request id, also in X-Request-ID.")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Return OpenAPI `responses` entries that document `statuses` with ErrorBody."""
    return {
        status: {"model": ErrorBody, "description": _DESCRIPTIONS.get(status, "Error.")}
        for status in statuses
    }


_DESCRIPTIONS = {
    400: "Malformed request body, such as invalid JSON.",
    401: "Missing or invalid API key, or a key in the query string.",
    404: "No such agent, or no such host with cached images.",
    409: "The agent is not in a state that allows this request.",
    413: "Request body over the limit.",
    422: "Invalid request: body, path or query parameter.",
    429: "Over a rate limit; see Retry-After.",
    502: "The agent cannot be reached.",
    503: "A supervisor or the agent store does not respond.",
    504: "The agent did not respond in time.",
}
# Every route but /healthz can get these, whatever it does.
COMMON_ERROR_STATUSES = (400, 401, 413, 422, 429)


class ApiError(Exception):
    """An error returned to the client with `status` and a fixed `code`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class BodyTooLarge(StarletteHTTPException):
    """The client sent more body bytes than the route allows (`limit`, in bytes).

    While FastAPI (0.165) reads a request body, it re-raises only Starlette HTTPExceptions and
    turns any other error into a 400 "There was an error parsing the body". Deriving from
    HTTPException keeps the 413 for a chunked body that goes over the limit.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes")
        self.limit = limit


def error_body(code: str, message: str, *, details: Any = None) -> dict[str, Any]:
    """Return the JSON body of an error response."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error, "request_id": logs.current_correlation_id()}


def error_response(status: int, code: str, message: str, *, details: Any = None) -> JSONResponse:
    """Return a JSON error response."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(code, message, details=details), status, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, including framework and unexpected ones, a JSON error body."""

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(BodyTooLarge)
    async def on_body_too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, "body_too_large", exc.detail)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"location": [str(part) for part in error["loc"]], "message": error["msg"]}
            for error in exc.errors()
        ]
        first = details[0] if details else {"location": [], "message": "invalid"}
        message = f"invalid request: {'.'.join(first['location'])}: {first['message']}"
        return error_response(422, "invalid_request", message, details=details)

    @app.exception_handler(StoreError)
    async def on_store_error(request: Request, exc: StoreError) -> JSONResponse:
        # Agent state lives in Redis, so without it no route but /healthz and /readyz works.
        logger.error("Redis failed on %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "store_unavailable",
            "the gateway cannot reach its agent store (Redis); try again later",
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this handler in its outermost middleware, after RequestIdMiddleware has
        # unbound the request id and outside the access middleware, so the request id and the
        # rate-limit headers are restored here.
        request_id = getattr(request.state, "request_id", None)
        with logs.correlation_scope(request_id):
            logger.error(
                "unexpected error on %s %s: %r", request.method, request.url.path, exc, exc_info=exc
            )
            response = error_response(
                500, "internal_error", "unexpected gateway error; see its log"
            )
        if request_id is not None:
            response.headers["x-request-id"] = request_id
        response.raw_headers.extend(getattr(request.state, "rate_limit_headers", []))
        return response
