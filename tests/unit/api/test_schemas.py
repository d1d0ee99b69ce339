"""Tests for the validation of POST /v1/agents bodies."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from libs.common.messages import AgentRecord, AgentState
from services.api.errors import install_error_handlers
from services.api.schemas import AgentView, CreateAgentRequest, PurgeCacheRequest

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
        pytest.param("https://127.0.0.1:0/agent.tar", id="port-zero"),
        pytest.param("https://127.0.0.1:65536/agent.tar", id="port-over-65535"),
        pytest.param("https://127.0.0.1:https/agent.tar", id="port-not-number"),
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


@pytest.mark.parametrize("lifetime", [0, -5, 7 * 24 * 3600 + 1, 10**30])
def test_lifetime_out_of_range_rejected(lifetime: int) -> None:
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
        pytest.param({"VAR": "a\x00b"}, id="nul-in-value"),
        pytest.param({"V" * 129: "1"}, id="name-129"),
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


def domain_error(domains: Any) -> dict[str, Any]:
    """Validate `allowed_domains` that must be rejected and return its only error."""
    with pytest.raises(ValidationError) as error:
        CreateAgentRequest.model_validate(body(allowed_domains=domains))

    errors = error.value.errors()
    assert len(errors) == 1, errors
    assert errors[0]["loc"][0] == "allowed_domains"
    return dict(errors[0])


def test_allowed_domains_default_empty() -> None:
    assert CreateAgentRequest.model_validate(body()).allowed_domains == []


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param("example.test", id="plain"),
        pytest.param("api.example.test", id="subdomain"),
        pytest.param("*.example.test", id="wildcard"),
        pytest.param("test", id="single-label"),
        pytest.param("a-b.example.test", id="inner-dash"),
        pytest.param("xn--bcher-kva.test", id="punycode"),
        pytest.param("0.example.test", id="digit-first-label"),
        pytest.param("1password.test", id="label-starting-with-digit"),
        pytest.param("example.x0", id="alphanumeric-last-label"),
        pytest.param("a" * 63 + ".test", id="label-63"),
        pytest.param(".".join(["a" * 62] * 4), id="name-251"),
        pytest.param("a." * 125 + "abc", id="name-253"),
    ],
)
def test_allowed_domain_accepted(domain: str) -> None:
    request = CreateAgentRequest.model_validate(body(allowed_domains=[domain]))

    assert request.allowed_domains == [domain]


def test_allowed_domains_kept_in_order() -> None:
    domains = ["b.test", "*.a.test", "b.test"]

    assert CreateAgentRequest.model_validate(body(allowed_domains=domains)).allowed_domains == (
        domains
    )


def test_256_allowed_domains_accepted() -> None:
    domains = [f"d{index}.example.test" for index in range(256)]

    assert len(
        CreateAgentRequest.model_validate(body(allowed_domains=domains)).allowed_domains
    ) == (256)


def test_257_allowed_domains_rejected() -> None:
    error = domain_error([f"d{index}.example.test" for index in range(257)])

    assert error["loc"] == ("allowed_domains",)
    assert "256" in error["msg"]


@pytest.mark.parametrize(
    ("domain", "canonical"),
    [
        pytest.param("Example.test", "example.test", id="upper-case"),
        pytest.param("EXAMPLE.TEST", "example.test", id="all-upper-case"),
        pytest.param("*.Example.test", "*.example.test", id="upper-case-wildcard"),
        pytest.param("example.test.", "example.test", id="trailing-dot"),
        pytest.param("*.example.test.", "*.example.test", id="wildcard-trailing-dot"),
        pytest.param("Example.Test.", "example.test", id="upper-case-and-trailing-dot"),
        pytest.param("bücher.test", "xn--bcher-kva.test", id="unicode"),
        pytest.param("*.Bücher.test", "*.xn--bcher-kva.test", id="unicode-wildcard"),
        pytest.param("a." * 125 + "abc.", "a." * 125 + "abc", id="name-254-with-dot"),
    ],
)
def test_non_canonical_domain_suggests_spelling(domain: str, canonical: str) -> None:
    error = domain_error([domain])

    assert error["loc"] == ("allowed_domains", 0)
    assert repr(domain)[:40] in error["msg"]
    assert f"use {canonical!r}" in error["msg"]


@pytest.mark.parametrize(
    ("domain", "problem"),
    [
        pytest.param("10.0.0.1", "IP address", id="ipv4"),
        pytest.param("169.254.169.254", "IP address", id="metadata-ipv4"),
        pytest.param("127.1", "IP address", id="short-ipv4"),
        pytest.param("2130706433", "IP address", id="integer-ipv4"),
        pytest.param("0x7f.0x1", "IP address", id="hex-ipv4"),
        pytest.param("0x7f000001", "IP address", id="hex-integer-ipv4"),
        pytest.param("017.0.0.1", "IP address", id="octal-ipv4"),
        pytest.param("*.0.0.10", "IP address", id="wildcard-over-ipv4"),
        pytest.param("example.123", "IP address", id="numeric-last-label"),
        pytest.param("10.0.0.1.", "IP address", id="ipv4-trailing-dot"),
        pytest.param("Example.123", "IP address", id="upper-case-numeric-last-label"),
        pytest.param("[::1]", "not a host name", id="ipv6"),
        pytest.param("::1", "not a host name", id="bare-ipv6"),
        pytest.param("a" * 64 + ".test", "not a host name", id="label-64"),
        pytest.param("a." * 126 + "ab", "characters long", id="name-254"),
        pytest.param("a" * 5000, "characters long", id="name-5000"),
        pytest.param("", "not a host name", id="empty"),
        pytest.param(".example.test", "not a host name", id="leading-dot"),
        pytest.param("example..test", "not a host name", id="empty-label"),
        pytest.param("example.test..", "not a host name", id="two-trailing-dots"),
        pytest.param("*", "not a host name", id="wildcard-alone"),
        pytest.param("*.", "not a host name", id="wildcard-dot"),
        pytest.param("*example.test", "not a host name", id="wildcard-without-dot"),
        pytest.param("*.*.example.test", "not a host name", id="double-wildcard"),
        pytest.param("www.*.example.test", "not a host name", id="inner-wildcard"),
        pytest.param("-a.test", "not a host name", id="leading-dash"),
        pytest.param("a-.test", "not a host name", id="trailing-dash"),
        pytest.param("exam_ple.test", "not a host name", id="underscore"),
        pytest.param("example.test:443", "not a host name", id="port"),
        pytest.param("https://example.test", "not a host name", id="url"),
        pytest.param("user@example.test", "not a host name", id="userinfo"),
        pytest.param("example.test/", "not a host name", id="slash"),
        pytest.param(" example.test", "not a host name", id="leading-space"),
        pytest.param("example.test\n", "not a host name", id="trailing-newline"),
        pytest.param("exa\x00mple.test", "not a host name", id="nul"),
        pytest.param("exa\u200bmple.test", "not a host name", id="zero-width-space"),
        pytest.param("Exa\u00admple.test", "not a host name", id="soft-hyphen"),
        pytest.param("Example.test\t", "not a host name", id="upper-case-and-tab"),
    ],
)
def test_invalid_domain_rejected(domain: str, problem: str) -> None:
    error = domain_error([domain])

    assert error["loc"] == ("allowed_domains", 0)
    assert problem in error["msg"]
    assert "use '" not in error["msg"]


def test_invalid_domain_named_with_position() -> None:
    error = domain_error(["example.test", "*.example.test", "Bad.test"])

    assert error["loc"] == ("allowed_domains", 2)
    assert "'Bad.test'" in error["msg"]


def test_long_invalid_domain_shortened_in_message() -> None:
    error = domain_error(["a" * 5000])

    assert "5000 characters" in error["msg"]
    assert len(error["msg"]) < 300


@pytest.mark.parametrize(
    "domains",
    [
        pytest.param("example.test", id="string"),
        pytest.param([1], id="number"),
        pytest.param([None], id="null-entry"),
        pytest.param(None, id="null"),
        pytest.param({"example.test": True}, id="object"),
    ],
)
def test_allowed_domains_wrong_type_rejected(domains: Any) -> None:
    domain_error(domains)


def test_invalid_domain_is_gateway_422() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/agents")
    async def create(request: CreateAgentRequest) -> dict[str, int]:
        return {"domains": len(request.allowed_domains)}

    with TestClient(app) as client:
        response = client.post("/agents", json=body(allowed_domains=["ok.test", "Example.test"]))

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("invalid request: body.allowed_domains.1: ")
    assert "'Example.test'" in error["message"]
    assert "use 'example.test'" in error["message"]
    assert error["details"][0]["location"] == ["body", "allowed_domains", "1"]


def test_agent_view_shows_allowed_domains() -> None:
    record = AgentRecord(
        agent_id="ag-" + "0" * 32,
        state=AgentState.REQUESTED,
        image_url=URL,
        image_digest=DIGEST,
        lifetime_seconds=60,
        correlation_id="req-1",
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
        allowed_domains=["example.test", "*.example.test"],
    )

    assert AgentView.of(record).allowed_domains == ["example.test", "*.example.test"]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="everything"),
        pytest.param({"digest": DIGEST}, id="one-digest"),
        pytest.param({"host_id": "host-1"}, id="one-host"),
        pytest.param({"digest": DIGEST, "host_id": "host-1.example"}, id="digest-on-host"),
    ],
)
def test_purge_body_accepted(fields: dict[str, Any]) -> None:
    request = PurgeCacheRequest.model_validate(fields)

    assert request.digest == fields.get("digest")
    assert request.host_id == fields.get("host_id")


@pytest.mark.parametrize(
    ("fields", "location"),
    [
        pytest.param({"digest": "sha256:abc"}, "digest", id="short-digest"),
        pytest.param({"digest": 5}, "digest", id="digest-not-a-string"),
        pytest.param({"host_id": "host 1"}, "host_id", id="space-in-host"),
        pytest.param({"host_id": "a.>"}, "host_id", id="nats-wildcard-host"),
        pytest.param({"host_id": ""}, "host_id", id="empty-host"),
        pytest.param({"all": True}, "all", id="unknown-field"),
    ],
)
def test_purge_body_rejected(fields: dict[str, Any], location: str) -> None:
    with pytest.raises(ValidationError) as error:
        PurgeCacheRequest.model_validate(fields)

    assert error_fields(error) == [location]
