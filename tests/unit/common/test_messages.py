"""Tests for the NATS message schemas: strictness, versioning and identifier patterns."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from libs.common.messages import (
    AgentNetworkPolicy,
    AgentRecord,
    AuditEvent,
    AuditOutcome,
    CachePurgeReply,
    CachePurgeRequest,
    FirewallState,
    LogLine,
    LogsRequest,
    RegisterAgentRequest,
    StartAgentRequest,
    StopAgentRequest,
    firewall_agents_subject,
    firewall_state_subject,
    host_subject,
    new_agent_id,
    state_subject,
)

AGENT_ID = "ag-" + "0123456789abcdef" * 2
DIGEST = "sha256:" + "ab" * 32


def start_request(**fields: Any) -> dict[str, Any]:
    """Return the fields of a valid StartAgentRequest, updated with `fields`."""
    return {
        "correlation_id": "req-1",
        "agent_id": AGENT_ID,
        "image_url": "https://127.0.0.1/agent.tar",
        "image_digest": DIGEST,
        "lifetime_seconds": 60,
        **fields,
    }


def audit_event(**fields: Any) -> dict[str, Any]:
    """Return the fields of a valid AuditEvent, updated with `fields`."""
    return {
        "service": "api",
        "host": "unit-host",
        "type": "agent.created",
        "actor": "key-1",
        "outcome": "success",
        **fields,
    }


def error_fields(error: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    """Return the first location part of every validation error."""
    return [str(detail["loc"][0]) for detail in error.value.errors()]


def test_start_request_accepts_valid_fields() -> None:
    request = StartAgentRequest.model_validate(start_request())

    assert request.schema_version == 1
    assert request.kind == "start_agent"


def test_start_request_round_trips_json() -> None:
    request = StartAgentRequest.model_validate(start_request(env={"MODE": "fast"}))

    decoded = StartAgentRequest.model_validate_json(request.model_dump_json())

    assert decoded == request


def test_start_request_allowed_domains_default_empty() -> None:
    assert StartAgentRequest.model_validate(start_request()).allowed_domains == []


def test_start_request_allowed_domains_round_trip() -> None:
    domains = ["example.test", "*.example.test", "xn--bcher-kva.test"]
    request = StartAgentRequest.model_validate(start_request(allowed_domains=domains))

    decoded = StartAgentRequest.model_validate_json(request.model_dump_json())

    assert decoded == request
    assert decoded.allowed_domains == domains


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param("Example.test", id="upper-case"),
        pytest.param("example.test.", id="trailing-dot"),
        pytest.param("*", id="wildcard-alone"),
        pytest.param("a" * 64 + ".test", id="label-64"),
        pytest.param("example.test:443", id="port"),
    ],
)
def test_start_request_invalid_domain_rejected(domain: str) -> None:
    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(allowed_domains=["ok.test", domain]))

    assert [detail["loc"] for detail in error.value.errors()] == [("allowed_domains", 1)]


def test_start_request_257_domains_rejected() -> None:
    domains = [f"d{index}.test" for index in range(257)]

    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(allowed_domains=domains))

    assert error_fields(error) == ["allowed_domains"]


def test_start_request_256_domains_accepted() -> None:
    domains = [f"d{index}.test" for index in range(256)]

    request = StartAgentRequest.model_validate(start_request(allowed_domains=domains))

    assert request.allowed_domains == domains


def agent_record(**fields: Any) -> dict[str, Any]:
    """Return the fields of a valid AgentRecord, updated with `fields`."""
    return {
        "agent_id": AGENT_ID,
        "state": "ready",
        "image_url": "https://127.0.0.1/agent.tar",
        "image_digest": DIGEST,
        "lifetime_seconds": 60,
        "correlation_id": "c",
        "created_at": "2024-01-01T00:00:00Z",
        **fields,
    }


def test_record_without_allowed_domains_reads_as_empty() -> None:
    # Records stored before the field existed have no such key.
    record = AgentRecord.model_validate_json(json.dumps(agent_record()))

    assert record.allowed_domains == []


def test_record_allowed_domains_round_trip() -> None:
    record = AgentRecord.model_validate(agent_record(allowed_domains=["*.example.test"]))

    decoded = AgentRecord.model_validate_json(record.model_dump_json())

    assert decoded == record
    assert decoded.allowed_domains == ["*.example.test"]


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        pytest.param(StartAgentRequest, start_request(), id="start"),
        pytest.param(StopAgentRequest, {"correlation_id": "c", "agent_id": AGENT_ID}, id="stop"),
        pytest.param(
            LogsRequest, {"correlation_id": "c", "agent_id": AGENT_ID, "tail": 10}, id="logs"
        ),
        pytest.param(LogLine, {"stream": "stdout", "time": None, "text": "hi"}, id="log-line"),
        pytest.param(AuditEvent, audit_event(), id="audit"),
        pytest.param(
            AgentRecord,
            {
                "agent_id": AGENT_ID,
                "state": "ready",
                "image_url": "https://127.0.0.1/agent.tar",
                "image_digest": DIGEST,
                "lifetime_seconds": 60,
                "correlation_id": "c",
                "created_at": "2024-01-01T00:00:00Z",
            },
            id="record",
        ),
    ],
)
def test_unknown_field_rejected(model: type[BaseModel], fields: dict[str, Any]) -> None:
    model.model_validate(fields)

    with pytest.raises(ValidationError) as error:
        model.model_validate({**fields, "privileged": True})

    assert error_fields(error) == ["privileged"]


@pytest.mark.parametrize("version", [0, 2, "2", None, True, 1.0, "1"])
def test_unknown_schema_version_rejected(version: Any) -> None:
    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(schema_version=version))

    assert error_fields(error) == ["schema_version"]


def test_unknown_schema_version_rejected_in_json() -> None:
    payload = json.dumps(start_request(schema_version=2))

    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate_json(payload)

    assert error_fields(error) == ["schema_version"]


def test_audit_event_unknown_version_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        AuditEvent.model_validate(audit_event(schema_version=2))

    assert error_fields(error) == ["schema_version"]


def test_wrong_kind_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(kind="stop_agent"))

    assert error_fields(error) == ["kind"]


@pytest.mark.parametrize(
    "agent_id",
    [
        pytest.param("ag-" + "A" * 32, id="upper-case"),
        pytest.param("ag-" + "0" * 31, id="short"),
        pytest.param("ag-" + "0" * 33, id="long"),
        pytest.param("0" * 32, id="no-prefix"),
        pytest.param("AG-" + "0" * 32, id="upper-prefix"),
        pytest.param("ag-" + "g" * 32, id="not-hex"),
        pytest.param("ag-" + "0" * 32 + "\n", id="trailing-newline"),
        pytest.param("ag-" + "0" * 30 + ".>", id="subject-wildcard"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_agent_id_rejected(agent_id: str) -> None:
    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(agent_id=agent_id))

    assert error_fields(error) == ["agent_id"]


@pytest.mark.parametrize(
    "digest",
    [
        pytest.param("sha256:" + "AB" * 32, id="upper-case"),
        pytest.param("sha256:" + "a" * 63, id="short"),
        pytest.param("sha256:" + "a" * 65, id="long"),
        pytest.param("a" * 64, id="no-prefix"),
        pytest.param("sha512:" + "a" * 64, id="other-algorithm"),
        pytest.param("sha256:" + "a" * 64 + "\n", id="trailing-newline"),
    ],
)
def test_invalid_digest_rejected(digest: str) -> None:
    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(image_digest=digest))

    assert error_fields(error) == ["image_digest"]


@pytest.mark.parametrize("name", ["PATH", "_PRIVATE", "a1", "X" * 128])
def test_valid_env_name_accepted(name: str) -> None:
    request = StartAgentRequest.model_validate(start_request(env={name: "1"}))

    assert request.env == {name: "1"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("1ST", id="leading-digit"),
        pytest.param("A-B", id="dash"),
        pytest.param("A=B", id="equals"),
        pytest.param("A B", id="space"),
        pytest.param("A\nB", id="newline"),
        pytest.param("X" * 129, id="too-long"),
    ],
)
def test_invalid_env_name_rejected(name: str) -> None:
    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(env={name: "1"}))

    assert error_fields(error) == ["env"]


def test_too_many_env_variables_rejected() -> None:
    env = {f"V{index}": "1" for index in range(65)}

    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(env=env))

    assert error_fields(error) == ["env"]


def test_long_env_value_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(env={"V": "x" * 4097}))

    assert error_fields(error) == ["env"]


@pytest.mark.parametrize("lifetime", [0, -1])
def test_non_positive_lifetime_rejected(lifetime: int) -> None:
    with pytest.raises(ValidationError) as error:
        StartAgentRequest.model_validate(start_request(lifetime_seconds=lifetime))

    assert error_fields(error) == ["lifetime_seconds"]


@pytest.mark.parametrize("correlation_id", ["", "has space", "x" * 129, "a\nb"])
def test_invalid_correlation_id_rejected(correlation_id: str) -> None:
    with pytest.raises(ValidationError) as error:
        StopAgentRequest.model_validate({"correlation_id": correlation_id, "agent_id": AGENT_ID})

    assert error_fields(error) == ["correlation_id"]


def test_messages_are_frozen() -> None:
    request = StopAgentRequest(correlation_id="c", agent_id=AGENT_ID)

    with pytest.raises(ValidationError):
        request.agent_id = "ag-" + "1" * 32  # type: ignore[misc]


def test_new_agent_id_matches_pattern() -> None:
    request = StopAgentRequest(correlation_id="c", agent_id=new_agent_id())

    assert request.agent_id.startswith("ag-")


def test_new_agent_ids_differ() -> None:
    assert new_agent_id() != new_agent_id()


def test_audit_event_subject() -> None:
    event = AuditEvent.model_validate(audit_event(service="supervisor", type="agent.stopped"))

    assert event.subject == "audit.supervisor.agent.stopped"


def test_audit_event_defaults() -> None:
    event = AuditEvent.model_validate(audit_event())

    assert event.schema_version == 1
    assert event.outcome == AuditOutcome.SUCCESS
    assert event.time.tzinfo is not None
    assert len(event.event_id) == 32


@pytest.mark.parametrize(
    "event_type",
    [
        pytest.param("agent", id="no-dot"),
        pytest.param("Agent.Created", id="upper-case"),
        pytest.param("agent..created", id="empty-part"),
        pytest.param("agent.>", id="wildcard"),
        pytest.param("agent.created.", id="trailing-dot"),
        pytest.param("agent created.x", id="space"),
    ],
)
def test_invalid_audit_type_rejected(event_type: str) -> None:
    with pytest.raises(ValidationError) as error:
        AuditEvent.model_validate(audit_event(type=event_type))

    assert error_fields(error) == ["type"]


def test_unknown_audit_outcome_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        AuditEvent.model_validate(audit_event(outcome="maybe"))

    assert error_fields(error) == ["outcome"]


def test_host_subject() -> None:
    assert host_subject("host-1", "stop") == "agents.v1.host.host-1.stop"


def test_cache_subject() -> None:
    assert host_subject("host-1", "cache") == "agents.v1.host.host-1.cache"


def test_state_subject() -> None:
    assert state_subject(AGENT_ID) == f"agents.v1.state.{AGENT_ID}"


def network_policy(**fields: Any) -> dict[str, Any]:
    """Return the fields of a valid AgentNetworkPolicy, updated with `fields`."""
    return {"agent_id": AGENT_ID, "address": "172.30.0.2", **fields}


def firewall_state(**fields: Any) -> dict[str, Any]:
    """Return the fields of a valid FirewallState, updated with `fields`."""
    return {
        "correlation_id": "netguard-host-1",
        "host_id": "host-1",
        "enabled": True,
        "verified": True,
        "ruleset_hash": "sha256:" + "a" * 64,
        "checked_at": "2026-01-01T00:00:00Z",
        "check_interval": 5.0,
        **fields,
    }


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param("example.test", id="plain"),
        pytest.param("*.example.test", id="wildcard"),
        pytest.param("test", id="single-label"),
        pytest.param("a-b.example.test", id="inner-dash"),
        pytest.param("xn--bcher-kva.test", id="punycode"),
        pytest.param("0.example.test", id="digit-label"),
        pytest.param("a" * 63 + ".test", id="label-63"),
        pytest.param(".".join(["a" * 62] * 4), id="name-251"),
    ],
)
def test_valid_domain_pattern_accepted(domain: str) -> None:
    policy = AgentNetworkPolicy.model_validate(network_policy(allowed_domains=[domain]))

    assert policy.allowed_domains == [domain]


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param("Example.test", id="upper-case"),
        pytest.param("example.test.", id="trailing-dot"),
        pytest.param(".example.test", id="leading-dot"),
        pytest.param("example..test", id="empty-label"),
        pytest.param("*example.test", id="wildcard-without-dot"),
        pytest.param("*", id="wildcard-alone"),
        pytest.param("*.*.example.test", id="double-wildcard"),
        pytest.param("www.*.example.test", id="inner-wildcard"),
        pytest.param("a" * 64 + ".test", id="label-64"),
        pytest.param(".".join(["a" * 63] * 4), id="name-255"),
        pytest.param("-a.test", id="leading-dash"),
        pytest.param("a-.test", id="trailing-dash"),
        pytest.param("exam_ple.test", id="underscore"),
        pytest.param("bücher.test", id="unicode"),
        pytest.param("example.test\n", id="trailing-newline"),
        pytest.param("example.test:443", id="port"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_domain_pattern_rejected(domain: str) -> None:
    with pytest.raises(ValidationError) as error:
        AgentNetworkPolicy.model_validate(network_policy(allowed_domains=[domain]))

    assert error_fields(error) == ["allowed_domains"]


def test_too_many_domain_patterns_rejected() -> None:
    domains = [f"d{index}.test" for index in range(257)]

    with pytest.raises(ValidationError) as error:
        AgentNetworkPolicy.model_validate(network_policy(allowed_domains=domains))

    assert error_fields(error) == ["allowed_domains"]


@pytest.mark.parametrize("address", ["172.30.0.2", "10.0.0.1", "192.168.255.254"])
def test_valid_policy_address_accepted(address: str) -> None:
    policy = AgentNetworkPolicy.model_validate(network_policy(address=address))

    assert policy.address == address


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("", id="empty"),
        pytest.param("10.0.0", id="three-parts"),
        pytest.param("10.0.0.1.2", id="five-parts"),
        pytest.param("10.0.0.1/32", id="prefix"),
        pytest.param("::1", id="ipv6"),
        pytest.param("10.0.0.1\n", id="trailing-newline"),
        pytest.param(" 10.0.0.1", id="leading-space"),
        pytest.param("a.b.c.d", id="letters"),
        pytest.param("localhost", id="host-name"),
        pytest.param("1000.0.0.1", id="four-digit-octet"),
    ],
)
def test_invalid_policy_address_rejected(address: str) -> None:
    with pytest.raises(ValidationError) as error:
        AgentNetworkPolicy.model_validate(network_policy(address=address))

    assert error_fields(error) == ["address"]


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("999.1.1.1", id="octet-above-255"),
        pytest.param("010.0.0.1", id="leading-zero"),
        pytest.param("\u0661\u0660.0.0.1", id="arabic-indic-digits"),
    ],
)
def test_non_ipv4_policy_address_rejected(address: str) -> None:
    with pytest.raises(ValidationError):
        AgentNetworkPolicy.model_validate(network_policy(address=address))


def test_policy_unknown_field_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        AgentNetworkPolicy.model_validate(network_policy(allow_all=True))

    assert error_fields(error) == ["allow_all"]


def test_register_request_round_trips_json() -> None:
    request = RegisterAgentRequest.model_validate(
        {
            "correlation_id": "c",
            "add": True,
            "policy": network_policy(allowed_domains=["*.example.test"]),
        }
    )

    decoded = RegisterAgentRequest.model_validate_json(request.model_dump_json())

    assert decoded == request
    assert decoded.kind == "register_agent"


def test_register_request_invalid_policy_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        RegisterAgentRequest.model_validate(
            {"correlation_id": "c", "add": True, "policy": network_policy(agent_id="ag-1")}
        )

    assert error_fields(error) == ["policy"]


def test_firewall_state_round_trips_json() -> None:
    state = FirewallState.model_validate(firewall_state(detail="ok"))

    assert FirewallState.model_validate_json(state.model_dump_json()) == state


def test_firewall_state_unknown_field_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        FirewallState.model_validate(firewall_state(trusted=True))

    assert error_fields(error) == ["trusted"]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"check_interval": float("nan")}, id="nan-interval"),
        pytest.param({"check_interval": float("inf")}, id="infinite-interval"),
        pytest.param({"check_interval": 0}, id="zero-interval"),
        pytest.param({"check_interval": 1e9}, id="huge-interval"),
        pytest.param({"checked_at": "2026-01-01T00:00:00"}, id="naive-time"),
    ],
)
def test_firewall_state_bad_timing_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        FirewallState.model_validate(firewall_state(**fields))


def test_firewall_subjects() -> None:
    assert firewall_state_subject("host-1") == "netguard.v1.host.host-1.state"
    assert firewall_agents_subject("host-1") == "netguard.v1.host.host-1.agents"


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="all-images"),
        pytest.param({"digest": None}, id="explicit-all"),
        pytest.param({"digest": DIGEST}, id="one-digest"),
    ],
)
def test_cache_purge_request_accepted(fields: dict[str, Any]) -> None:
    request = CachePurgeRequest(correlation_id="req-1", **fields)

    assert request.kind == "cache_purge"
    assert request.digest == fields.get("digest")


@pytest.mark.parametrize(
    ("fields", "location"),
    [
        pytest.param({"digest": "sha256:" + "AB" * 32}, "digest", id="upper-case-digest"),
        pytest.param({"digest": "ab" * 32}, "digest", id="digest-without-prefix"),
        pytest.param({"digest": "sha512:" + "ab" * 64}, "digest", id="other-algorithm"),
        pytest.param({"host_id": "host-1"}, "host_id", id="unknown-field"),
        pytest.param({"schema_version": 2}, "schema_version", id="newer-version"),
    ],
)
def test_cache_purge_request_rejected(fields: dict[str, Any], location: str) -> None:
    with pytest.raises(ValidationError) as error:
        CachePurgeRequest.model_validate({"correlation_id": "req-1", **fields})

    assert error_fields(error) == [location]


def test_cache_purge_reply_round_trip() -> None:
    reply = CachePurgeReply(
        correlation_id="req-1",
        host_id="host-1",
        purged=[{"digest": DIGEST, "size": 10, "image_removed": True}],  # type: ignore[list-item]
        skipped=[{"digest": "sha256:" + "cd" * 32, "reason": "in_use"}],  # type: ignore[list-item]
    )

    decoded = CachePurgeReply.model_validate_json(reply.model_dump_json())

    assert decoded == reply
    assert decoded.skipped[0].reason == "in_use"


@pytest.mark.parametrize(
    ("skipped", "location"),
    [
        pytest.param({"digest": DIGEST, "reason": "busy"}, "reason", id="unknown-reason"),
        pytest.param({"digest": DIGEST, "reason": "in_use", "x": 1}, "x", id="unknown-field"),
    ],
)
def test_cache_purge_reply_rejects_unknown_values(skipped: dict[str, Any], location: str) -> None:
    with pytest.raises(ValidationError) as error:
        CachePurgeReply.model_validate(
            {"correlation_id": "req-1", "host_id": "host-1", "purged": [], "skipped": [skipped]}
        )

    assert [str(detail["loc"][-1]) for detail in error.value.errors()] == [location]
