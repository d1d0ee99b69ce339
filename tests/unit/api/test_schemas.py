"""Tests for the validation of POST /v1/agents bodies."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.api.schemas import CreateAgentRequest

DIGEST = "sha256:" + "ab" * 32
URL = "https://127.0.0.1/images/agent.tar"


def body(**fields: Any) -> dict[str, Any]:
    """Return a valid request body updated with `fields`."""
    return {"image_url": URL, "image_digest": DIGEST, **fields}


def error_fields(error: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    """Return the first location part of every validation error."""
    return [str(detail["loc"][0]) for detail in error.value.errors()]


def test_minimal_request_accepted() -> None:
    request = CreateAgentRequest.model_validate(body())

    assert request.lifetime_seconds is None
    assert request.env == {}


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://127.0.0.1/agent.tar", id="https"),
        pytest.param("https://127.0.0.1:8443/a/b.tar?sig=abc", id="port-and-query"),
        pytest.param("http://127.0.0.1/agent.tar", id="http"),
        pytest.param("HTTPS://127.0.0.1/agent.tar", id="upper-case-scheme"),
        pytest.param("https://[::1]/agent.tar", id="ipv6"),
    ],
)
def test_url_accepted(url: str) -> None:
    assert CreateAgentRequest.model_validate(body(image_url=url)).image_url == url


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ftp://127.0.0.1/agent.tar", id="ftp"),
        pytest.param("file:///etc/passwd", id="file"),
        pytest.param("gopher://127.0.0.1/", id="gopher"),
        pytest.param("127.0.0.1/agent.tar", id="no-scheme"),
        pytest.param("//127.0.0.1/agent.tar", id="scheme-relative"),
        pytest.param("https:///agent.tar", id="no-host"),
        pytest.param("https://user@127.0.0.1/agent.tar", id="user"),
        pytest.param("https://user:pw@127.0.0.1/agent.tar", id="user-password"),
        pytest.param("https://:pw@127.0.0.1/agent.tar", id="password-only"),
        pytest.param("https://:@127.0.0.1/agent.tar", id="empty-credentials"),
        pytest.param("https://127.0.0.1/a b.tar", id="space"),
        pytest.param(" https://127.0.0.1/agent.tar", id="leading-space"),
        pytest.param("https://127.0.0.1/agent.tar\t", id="trailing-tab"),
        pytest.param("https://127.0.0.1/\tagent.tar", id="tab"),
        pytest.param("https://127.0.0.1/agent.tar\r\nX-Injected: 1", id="crlf"),
        pytest.param("https://127.0.0.1/\x00agent.tar", id="nul"),
        pytest.param("https://127.0.0.1/\x7fagent.tar", id="del"),
        pytest.param("https://127.0.0.1/\x1b[31m", id="escape"),
        pytest.param("https://127.0.0.1/" + "a" * 2031, id="too-long"),
    ],
)
def test_url_rejected(url: str) -> None:
    with pytest.raises(ValidationError) as error:
        CreateAgentRequest.model_validate(body(image_url=url))

    assert error_fields(error) == ["image_url"]


def test_url_at_length_limit_accepted() -> None:
    url = "https://127.0.0.1/" + "a" * 2030

    assert len(CreateAgentRequest.model_validate(body(image_url=url)).image_url) == 2048


def test_credentials_not_echoed() -> None:
    with pytest.raises(ValidationError) as error:
        CreateAgentRequest.model_validate(body(image_url="https://user:hunter2@127.0.0.1/a.tar"))

    assert "hunter2" not in error.value.errors()[0]["msg"]


@pytest.mark.parametrize(
    "digest",
    ["sha256:" + "AB" * 32, "sha256:" + "a" * 63, "a" * 64, "sha512:" + "a" * 64],
)
def test_digest_rejected(digest: str) -> None:
    with pytest.raises(ValidationError) as error:
        CreateAgentRequest.model_validate(body(image_digest=digest))

    assert error_fields(error) == ["image_digest"]


@pytest.mark.parametrize("lifetime", [0, -5])
def test_non_positive_lifetime_rejected(lifetime: int) -> None:
    with pytest.raises(ValidationError) as error:
        CreateAgentRequest.model_validate(body(lifetime_seconds=lifetime))

    assert error_fields(error) == ["lifetime_seconds"]


def test_env_at_limits_accepted() -> None:
    env = {f"VAR_{index}": "v" * 4096 for index in range(64)}

    assert CreateAgentRequest.model_validate(body(env=env)).env == env


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({f"VAR_{index}": "1" for index in range(65)}, id="65-variables"),
        pytest.param({"VAR": "v" * 4097}, id="long-value"),
        pytest.param({"1VAR": "1"}, id="leading-digit"),
        pytest.param({"VAR-NAME": "1"}, id="dash"),
        pytest.param({"A=B": "1"}, id="equals"),
        pytest.param({"": "1"}, id="empty-name"),
        pytest.param({"VAR": 1}, id="number-value"),
        pytest.param({"VAR": None}, id="null-value"),
        pytest.param(["VAR=1"], id="list"),
    ],
)
def test_env_rejected(env: Any) -> None:
    with pytest.raises(ValidationError) as error:
        CreateAgentRequest.model_validate(body(env=env))

    assert error_fields(error) == ["env"]


@pytest.mark.parametrize("field", ["privileged", "volumes", "network_mode", "command", "Env"])
def test_unknown_field_rejected(field: str) -> None:
    with pytest.raises(ValidationError) as error:
        CreateAgentRequest.model_validate(body(**{field: True}))

    assert error_fields(error) == [field]


@pytest.mark.parametrize("field", ["image_url", "image_digest"])
def test_missing_field_rejected(field: str) -> None:
    fields = body()
    del fields[field]

    with pytest.raises(ValidationError) as error:
        CreateAgentRequest.model_validate(fields)

    assert error_fields(error) == [field]
