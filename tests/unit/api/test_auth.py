"""Tests for API key authentication of the gateway: the key ring and where keys are read."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.datastructures import Headers

from libs.common.apikeys import StoredKey, generate_key, hash_key, key_file_line
from libs.common.errors import ConfigurationError
from services.api.auth import (
    AuthReason,
    Credential,
    KeyRing,
    authenticate,
    has_query_key,
    presented_key,
)

CI_KEY = "ar_ci-key-for-unit-tests"
OPS_KEY = "ar_ops-key-for-unit-tests"


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing(
        [
            StoredKey(key_id="ci", digest=hash_key(CI_KEY)),
            StoredKey(key_id="ops", digest=hash_key(OPS_KEY)),
        ]
    )


@pytest.mark.parametrize(
    ("presented", "expected"),
    [
        pytest.param(CI_KEY, "ci", id="first-key"),
        pytest.param(OPS_KEY, "ops", id="second-key"),
        pytest.param("ar_wrong", None, id="wrong-key"),
        pytest.param(CI_KEY[:-1], None, id="prefix-of-key"),
        pytest.param(CI_KEY + "x", None, id="key-plus-suffix"),
        pytest.param(CI_KEY.upper(), None, id="other-case"),
        pytest.param("", None, id="empty"),
        pytest.param("x" * 100_000, None, id="overlong"),
    ],
)
def test_identify(keyring: KeyRing, presented: str, expected: str | None) -> None:
    assert keyring.identify(presented) == expected


def test_identify_rejects_overlong_stored_key() -> None:
    # Keys over 256 characters are never hashed, even when one is stored.
    long_key = "k" * 257
    keyring = KeyRing([StoredKey(key_id="long", digest=hash_key(long_key))])

    assert keyring.identify(long_key) is None


def test_identify_accepts_key_at_length_limit() -> None:
    key = "k" * 256
    keyring = KeyRing([StoredKey(key_id="max", digest=hash_key(key))])

    assert keyring.identify(key) == "max"


def test_load_reads_key_file(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "keys"
    path.write_text(key_file_line("ci", key) + "\n")

    keyring = KeyRing.load(key_file=path, plain_keys=None)

    assert keyring.identify(key) == "ci"


def test_load_reads_plain_keys() -> None:
    keyring = KeyRing.load(key_file=None, plain_keys=f" {CI_KEY} ,{OPS_KEY}")

    assert len(keyring) == 2
    assert keyring.identify(CI_KEY) == "env-1"
    assert keyring.identify(OPS_KEY) == "env-2"


def test_load_combines_file_and_plain_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(key_file_line("ci", CI_KEY) + "\n")

    keyring = KeyRing.load(key_file=path, plain_keys=OPS_KEY)

    assert keyring.identify(CI_KEY) == "ci"
    assert keyring.identify(OPS_KEY) is not None


@pytest.mark.parametrize(
    "plain_keys",
    [
        pytest.param(None, id="unset"),
        pytest.param("", id="empty"),
        pytest.param(" , ,", id="only-separators"),
    ],
)
def test_load_without_keys_rejected(plain_keys: str | None) -> None:
    with pytest.raises(ConfigurationError) as error:
        KeyRing.load(key_file=None, plain_keys=plain_keys)

    assert "no API key configured" in str(error.value)


def test_load_with_empty_key_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# no keys yet\n")

    with pytest.raises(ConfigurationError):
        KeyRing.load(key_file=path, plain_keys=None)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"X-API-Key": CI_KEY}, CI_KEY, id="x-api-key"),
        pytest.param({"x-api-key": f"  {CI_KEY} "}, CI_KEY, id="x-api-key-padded"),
        pytest.param({"Authorization": f"Bearer {CI_KEY}"}, CI_KEY, id="bearer"),
        pytest.param({"Authorization": f"bearer {CI_KEY}"}, CI_KEY, id="bearer-lower-case"),
        pytest.param({"Authorization": f"BEARER {CI_KEY}"}, CI_KEY, id="bearer-upper-case"),
        pytest.param({"Authorization": f"Bearer   {CI_KEY}"}, CI_KEY, id="bearer-extra-spaces"),
        pytest.param({"Authorization": "Basic Y2k6c2VjcmV0"}, None, id="basic"),
        pytest.param({"Authorization": "Bearer "}, None, id="empty-bearer"),
        pytest.param({"Authorization": "Bearer"}, None, id="bearer-without-key"),
        pytest.param({"Authorization": CI_KEY}, None, id="no-scheme"),
        pytest.param({"Authorization": f"Token {CI_KEY}"}, None, id="token-scheme"),
        pytest.param({"X-API-Key": ""}, None, id="empty-x-api-key"),
        pytest.param({}, None, id="no-header"),
        pytest.param(
            {"X-API-Key": CI_KEY, "Authorization": f"Bearer {OPS_KEY}"},
            CI_KEY,
            id="x-api-key-first",
        ),
        pytest.param(
            {"X-API-Key": "", "Authorization": f"Bearer {OPS_KEY}"},
            OPS_KEY,
            id="empty-x-api-key-then-bearer",
        ),
    ],
)
def test_presented_key(headers: dict[str, str], expected: str | None) -> None:
    assert presented_key(Headers(headers)) == expected


@pytest.mark.parametrize(
    "name",
    [
        "apiKey",
        "APIKEY",
        "api_key",
        "API_KEY",
        "api-key",
        "Api-Key",
        "x-api-key",
        "X_API_KEY",
        "key",
        "Key",
        "token",
        "TOKEN",
        "access_token",
        "access-token",
        "api_token",
        "apitoken",
        "auth_token",
        "authorization",
        "Authorization",
        "bearer",
    ],
)
def test_query_key_detected(name: str) -> None:
    assert has_query_key(["wait", name]) is True


@pytest.mark.parametrize(
    "names",
    [
        pytest.param([], id="none"),
        pytest.param(["wait"], id="wait"),
        pytest.param(["keys", "tokens"], id="plural"),
        pytest.param(["api_keys", "keyid"], id="longer-names"),
        pytest.param(["monkey", "key_id", "refresh_token"], id="containing"),
    ],
)
def test_query_key_not_detected(names: list[str]) -> None:
    assert has_query_key(names) is False


@pytest.mark.parametrize(
    ("headers", "query", "reason", "credential", "key_id"),
    [
        pytest.param({"X-API-Key": CI_KEY}, [], "authenticated", "x-api-key", "ci", id="header"),
        pytest.param(
            {"Authorization": f"Bearer {OPS_KEY}"},
            [],
            "authenticated",
            "bearer",
            "ops",
            id="bearer",
        ),
        pytest.param({}, [], "missing_key", "none", None, id="missing"),
        pytest.param({"X-API-Key": "  "}, [], "missing_key", "none", None, id="blank-header"),
        pytest.param({"Authorization": "Basic eDp5"}, [], "missing_key", "none", None, id="basic"),
        pytest.param({"X-API-Key": "ar_wrong"}, [], "invalid_key", "x-api-key", None, id="wrong"),
        pytest.param(
            {"Authorization": "Bearer ar_wrong"},
            [],
            "invalid_key",
            "bearer",
            None,
            id="wrong-bearer",
        ),
        pytest.param({"X-API-Key": "k" * 300}, [], "invalid_key", "x-api-key", None, id="overlong"),
        pytest.param(
            {}, [("apiKey", CI_KEY)], "api_key_in_query", "query", "ci", id="valid-key-in-query"
        ),
        pytest.param(
            {}, [("token", "ar_wrong")], "api_key_in_query", "query", None, id="wrong-key-in-query"
        ),
        pytest.param(
            {"X-API-Key": CI_KEY},
            [("wait", "true"), ("api_key", "")],
            "api_key_in_query",
            "query",
            None,
            id="empty-query-key-with-header",
        ),
    ],
)
def test_authenticate(
    keyring: KeyRing,
    *,
    headers: dict[str, str],
    query: list[tuple[str, str]],
    reason: str,
    credential: str,
    key_id: str | None,
) -> None:
    auth = authenticate(keyring, Headers(headers), query)

    assert auth.reason == AuthReason(reason)
    assert auth.credential == Credential(credential)
    assert auth.key_id == key_id
    assert auth.ok is (reason == "authenticated")


def test_authenticate_names_query_parameter(keyring: KeyRing) -> None:
    auth = authenticate(keyring, Headers({}), [("wait", "1"), ("Api-Key", CI_KEY)])

    assert auth.parameter == "Api-Key"


def test_authentication_never_holds_key(keyring: KeyRing) -> None:
    for headers, query in (({"X-API-Key": CI_KEY}, []), ({}, [("key", CI_KEY)])):
        auth = authenticate(keyring, Headers(headers), query)

        assert CI_KEY not in repr(auth)
