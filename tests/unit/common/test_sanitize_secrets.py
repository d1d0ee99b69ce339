"""Tests for secret redaction and `clean_line`, which every collected log line passes through."""

from __future__ import annotations

import time

import pytest

from libs.common.apikeys import generate_key
from libs.common.sanitize import (
    TRUNCATION_MARKER,
    SecretRedactor,
    clean_line,
    max_line_bytes,
    redaction_marker,
)

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
API_KEY = generate_key()


@pytest.mark.parametrize(
    ("text", "kind", "kept"),
    [
        pytest.param("id AKIAIOSFODNN7EXAMPLE ok", "aws_access_key_id", "id {} ok", id="akia"),
        pytest.param("ASIAIOSFODNN7EXAMPLE", "aws_access_key_id", "{}", id="asia"),
        pytest.param(
            f"aws_secret_access_key = {AWS_SECRET}",
            "aws_secret_access_key",
            "aws_secret_access_key = {}",
            id="aws-secret-ini",
        ),
        pytest.param(
            f'"AWS_SECRET_ACCESS_KEY": "{AWS_SECRET}"',
            "aws_secret_access_key",
            '"AWS_SECRET_ACCESS_KEY": "{}"',
            id="aws-secret-json",
        ),
        pytest.param("key=AIza" + "b" * 35, "gcp_api_key", "key={}", id="gcp-api-key"),
        pytest.param(
            "DefaultEndpointsProtocol=https;AccountKey=" + "k" * 86 + "==;EndpointSuffix=x",
            "azure_storage_key",
            "DefaultEndpointsProtocol=https;AccountKey={};EndpointSuffix=x",
            id="azure-account-key",
        ),
        pytest.param(
            "GET /c/b?sv=2022&sig=abcdefghijklmnopqrst%2Buvw",
            "azure_sas_signature",
            "GET /c/b?sv=2022&sig={}",
            id="azure-sas",
        ),
        pytest.param(
            "Authorization: Bearer abc123def456",
            "bearer_token",
            "Authorization: Bearer {}",
            id="bearer-header",
        ),
        pytest.param(
            "curl -H 'bearer x1y2z3w4v5'", "bearer_token", "curl -H 'bearer {}'", id="bearer-lower"
        ),
        pytest.param(
            "authorization: Basic dXNlcjpwYXNzd29yZA==",
            "basic_credentials",
            "authorization: Basic {}",
            id="basic",
        ),
        pytest.param(f"token {JWT} end", "jwt", "token {} end", id="jwt"),
        pytest.param("ghp_" + "a" * 36, "github_token", "{}", id="github-classic"),
        pytest.param("github_pat_" + "a" * 40, "github_token", "{}", id="github-fine-grained"),
        pytest.param("xoxb-1234567890-abcdef", "slack_token", "{}", id="slack"),
        pytest.param(
            f"X-API-Key: {API_KEY}", "agent_runner_api_key", "X-API-Key: {}", id="api-key"
        ),
    ],
)
def test_secret_redacted(text: str, kind: str, kept: str) -> None:
    redacted, count = SecretRedactor().redact(text)

    assert redacted == kept.format(redaction_marker(kind))
    assert count == 1


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Bearer authentication is required", id="bearer-word"),
        pytest.param("AKIA is how AWS key ids start", id="akia-prefix-only"),
        pytest.param("XAKIAIOSFODNN7EXAMPLE", id="akia-inside-token"),
        pytest.param("var_" + "a" * 43, id="api-key-prefix-inside-word"),
        pytest.param("ar_" + "a" * 42, id="api-key-too-short"),
        pytest.param("ar_" + "a" * 44, id="api-key-too-long"),
        pytest.param("eyJhbGciOiJIUzI1NiJ9 without payload", id="jwt-header-only"),
        pytest.param("-----BEGIN PUBLIC KEY-----", id="public-key"),
        pytest.param("-----BEGIN CERTIFICATE-----", id="certificate"),
        pytest.param("plain log line: 200 OK in 12 ms", id="plain"),
    ],
)
def test_harmless_text_kept(text: str) -> None:
    redactor = SecretRedactor()

    assert redactor.redact(text) == (text, 0)
    assert redactor.in_key_block is False


def test_several_secrets_in_one_line() -> None:
    text = f"AKIAIOSFODNN7EXAMPLE and Bearer abc123def456 and {API_KEY}"

    redacted, count = SecretRedactor().redact(text)

    assert redacted == (
        "[REDACTED:aws_access_key_id] and Bearer [REDACTED:bearer_token] and "
        "[REDACTED:agent_runner_api_key]"
    )
    assert count == 3


def test_key_block_lines_redacted() -> None:
    redactor = SecretRedactor()
    lines = [
        "-----BEGIN RSA PRIVATE KEY-----",
        "Proc-Type: 4,ENCRYPTED",
        "DEK-Info: AES-128-CBC,0123456789ABCDEF",
        "",
        "MIIEpAIBAAKCAQEAx",
        "abcdEFGH+/==",
        "-----END RSA PRIVATE KEY-----",
        "next line",
    ]

    shown = [redactor.redact(line) for line in lines]

    marker = redaction_marker("private_key")
    assert shown == [
        ("-----BEGIN RSA PRIVATE KEY-----", 0),
        (marker, 1),
        (marker, 1),
        (marker, 1),
        (marker, 1),
        (marker, 1),
        ("-----END RSA PRIVATE KEY-----", 0),
        ("next line", 0),
    ]
    assert redactor.in_key_block is False


def test_key_block_with_carriage_returns() -> None:
    redactor = SecretRedactor()

    redactor.redact("-----BEGIN OPENSSH PRIVATE KEY-----\\r")
    body = redactor.redact("b3BlbnNzaC1rZXktdjEAAAAA\\r")

    assert body == (redaction_marker("private_key"), 1)
    assert redactor.in_key_block is True


def test_key_block_ends_at_other_text() -> None:
    redactor = SecretRedactor()

    redactor.redact("-----BEGIN PRIVATE KEY-----")
    redactor.redact("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC")
    after = redactor.redact("an ordinary log line, not base64")

    assert after == ("an ordinary log line, not base64", 0)
    assert redactor.in_key_block is False


def test_key_body_before_end_on_same_line() -> None:
    redactor = SecretRedactor()

    redactor.redact("-----BEGIN EC PRIVATE KEY-----")
    last = redactor.redact("MHcCAQEEIBase64==-----END EC PRIVATE KEY----- done")

    assert last == ("[REDACTED:private_key]-----END EC PRIVATE KEY----- done", 1)
    assert redactor.in_key_block is False


def test_key_block_on_one_line() -> None:
    text = (
        '{"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQ\\n-----END PRIVATE KEY-----\\n",'
        ' "client_email": "x@example.test"}'
    )
    redactor = SecretRedactor()

    redacted, count = redactor.redact(text)

    assert redacted == (
        '{"private_key": "-----BEGIN PRIVATE KEY-----[REDACTED:private_key]'
        '-----END PRIVATE KEY-----\\n", "client_email": "x@example.test"}'
    )
    assert count == 1
    assert redactor.in_key_block is False


def test_key_header_with_body_on_same_line() -> None:
    redactor = SecretRedactor()

    redacted, count = redactor.redact("key: -----BEGIN PRIVATE KEY----- MIIEvQIBADAN")

    assert redacted == "key: -----BEGIN PRIVATE KEY-----[REDACTED:private_key]"
    assert count == 1
    assert redactor.in_key_block is True


@pytest.mark.parametrize(
    ("skipped", "in_block"),
    [
        pytest.param([b"-----BEGIN RSA PRIVATE KEY-----"], True, id="header-skipped"),
        pytest.param([b"-----BEGIN RSA PRIVATE KEY-----", b"MIIE"], True, id="body-skipped"),
        pytest.param(
            [b"-----BEGIN RSA PRIVATE KEY-----", b"MIIE", b"-----END RSA PRIVATE KEY-----"],
            False,
            id="end-skipped",
        ),
        pytest.param([b"-----BEGIN RSA PRIVATE KEY-----", b"not a key line"], False, id="other"),
        pytest.param(
            [b"-----BEGIN PRIVATE KEY-----x-----END PRIVATE KEY-----"], False, id="one-line"
        ),
        pytest.param([b"-----BEGIN RSA PRIVATE KEY-----", b"MIIE\r"], True, id="body-with-cr"),
    ],
)
def test_skipped_lines_keep_block_state(skipped: list[bytes], in_block: bool) -> None:
    redactor = SecretRedactor()

    for raw in skipped:
        redactor.skip(raw)

    assert redactor.in_key_block is in_block


def test_body_after_skipped_header_redacted() -> None:
    redactor = SecretRedactor()

    redactor.skip(b"-----BEGIN RSA PRIVATE KEY-----")

    assert redactor.redact("MIIEpAIBAAKCAQEAx") == (redaction_marker("private_key"), 1)


def test_clean_line_escapes_then_redacts() -> None:
    line = clean_line(
        b"\x1b[31mAKIAIOSFODNN7EXAMPLE\x1b[0m\r", max_length=200, redactor=SecretRedactor()
    )

    assert line.text == "\\x1b[31m[REDACTED:aws_access_key_id]\\x1b[0m\\r"
    assert line.redactions == 1
    assert line.truncated is False


def test_clean_line_redacts_before_cut() -> None:
    raw = b"x" * 70 + b" Bearer abc123def456ghi789"

    line = clean_line(raw, max_length=80, redactor=SecretRedactor())

    assert line.text == ("x" * 70 + " Bearer [REDACTED:bearer_token]")[:80] + TRUNCATION_MARKER
    assert "abc123" not in line.text
    assert line.redactions == 1
    assert line.truncated is True


def test_clean_line_marks_line_cut_by_caller() -> None:
    line = clean_line(b"short", max_length=80, redactor=SecretRedactor(), truncated=True)

    assert line.text == "short" + TRUNCATION_MARKER
    assert line.truncated is True


def test_clean_line_of_huge_line_fast() -> None:
    raw = (b"Bearer abc123def456 " + b"\x1b" * 1000) * 10_000

    started = time.perf_counter()
    line = clean_line(raw, max_length=8192, redactor=SecretRedactor())
    elapsed = time.perf_counter() - started

    assert line.truncated is True
    assert len(line.text) == 8192 + len(TRUNCATION_MARKER)
    assert elapsed < 0.5


def test_max_line_bytes_allows_four_bytes_per_character() -> None:
    raw = "😀".encode() * 100

    line = clean_line(raw[: max_line_bytes(100)], max_length=100, redactor=SecretRedactor())

    assert line.text == "😀" * 100
    assert line.truncated is False
