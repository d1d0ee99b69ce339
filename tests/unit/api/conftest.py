"""A tiny gateway-like app with the real middleware and error handlers, served in-process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from services.api.errors import ApiError, install_error_handlers
from services.api.middleware import BodyLimitMiddleware, RequestIdMiddleware

CONTROL_LIMIT = 100
PASSTHROUGH_LIMIT = 1000


class Probe(BaseModel):
    """A JSON request body, which FastAPI reads and parses before the route runs."""

    text: str


def create_test_app() -> FastAPI:
    """Return an app with the gateway's request-id and body-limit middleware, its error
    handlers and probe routes; tests/unit/api/test_access.py covers the access middleware."""
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware, control_limit=CONTROL_LIMIT, passthrough_limit=PASSTHROUGH_LIMIT
    )
    app.add_middleware(RequestIdMiddleware)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    @app.post("/model")
    async def model(body: Probe) -> dict[str, int]:
        return {"received": len(body.text)}

    @app.post("/v1/agents/{agent_id}/http/{path:path}")
    async def passthrough(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    @app.get("/request-id")
    async def request_id(request: Request) -> dict[str, str]:
        return {"request_id": request.state.request_id}

    @app.get("/conflict")
    async def conflict() -> None:
        raise ApiError(409, "agent_not_running", "agent ag-1 is not running")

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("unexpected failure")

    @app.get("/items/{number}")
    async def item(number: int) -> dict[str, int]:
        return {"number": number}

    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    # Starlette's ServerErrorMiddleware re-raises after it has sent the 500 response; the
    # tests check the response, so the client must not re-raise too.
    with TestClient(create_test_app(), raise_server_exceptions=False) as test_client:
        yield test_client
