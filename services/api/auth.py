"""API-key authentication of the gateway.

Keys are accepted only in `X-API-Key` or `Authorization: Bearer`: a key in a URL ends up in
proxy and access logs, so a request carrying one in the query string is rejected even when
the key is right. Keys are kept as SHA-256 hashes; API keys are long random strings, so a
fast hash is enough and a stolen key file does not reveal them. Every stored hash is compared
with `hmac.compare_digest`, so the time taken does not depend on which key, if any, matched.

`authenticate` returns one `Authentication` per request with a fixed reason code, which the
access middleware (services/api/middleware.py) audits and turns into a response.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from libs.common.apikeys import StoredKey, hash_key, read_key_file
from libs.common.errors import ConfigurationError

logger = logging.getLogger(__name__)

# Query parameter names that clients and libraries use for API keys, compared in lower case
# with "-" read as "_". A request with any of them is rejected, whatever the value.
QUERY_KEY_PARAMETERS = frozenset(
    {
        "apikey",
        "api_key",
        "x_api_key",
        "key",
        "token",
        "access_token",
        "api_token",
        "apitoken",
        "auth_token",
        "authorization",
        "bearer",
    }
)
_MAX_KEY_LENGTH = 256


class AuthReason(StrEnum):
    """Fixed reason codes of authentication decisions, as audited and logged."""

    AUTHENTICATED = "authenticated"
    MISSING_KEY = "missing_key"
    INVALID_KEY = "invalid_key"
    KEY_IN_QUERY = "api_key_in_query"


class Credential(StrEnum):
    """Place in the request that carried the key."""

    X_API_KEY = "x-api-key"
    BEARER = "bearer"
    QUERY = "query"
    NONE = "none"


@dataclass(frozen=True, kw_only=True)
class Authentication:
    """The outcome of authenticating one request. It never contains the key itself.

    `key_id` is the id of the matching key: the caller's on success, and for
    `api_key_in_query` the key that the URL exposed, if it is a valid one, so that it can be
    rotated. `parameter` is the name of the query parameter that carried a key.
    """

    reason: AuthReason
    credential: Credential
    key_id: str | None = None
    parameter: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the request is authenticated."""
        return self.reason is AuthReason.AUTHENTICATED


class KeyRing:
    """The set of API keys the gateway accepts."""

    def __init__(self, keys: list[StoredKey]) -> None:
        self._keys = list(keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def key_ids(self) -> list[str]:
        """Return the ids of the accepted keys, never the keys or their hashes."""
        return [key.key_id for key in self._keys]

    @classmethod
    def load(cls, *, key_file: Path | None, plain_keys: str | None) -> KeyRing:
        """Read keys from a key file and from a comma-separated list of plain keys.

        Raises ConfigurationError naming the file and line of a malformed entry, or when no
        key is configured at all, because a gateway without keys would reject everything.
        """
        keys: list[StoredKey] = []
        if key_file is not None:
            keys.extend(read_key_file(key_file))
        if plain_keys:
            for index, key in enumerate(k.strip() for k in plain_keys.split(",")):
                if key:
                    keys.append(StoredKey(key_id=f"env-{index + 1}", digest=hash_key(key)))
        if not keys:
            raise ConfigurationError(
                "no API key configured; create one with 'agent-runner keys create --file "
                "FILE' and pass --api-keys-file FILE, or set AGENT_RUNNER_API_KEYS"
            )
        return cls(keys)

    def identify(self, presented: str) -> str | None:
        """Return the id of the key equal to `presented`, or None."""
        if not presented or len(presented) > _MAX_KEY_LENGTH:
            return None
        digest = hash_key(presented)
        match = None
        for stored in self._keys:
            if hmac.compare_digest(stored.digest, digest):
                match = stored.key_id
        return match


def presented_key(headers: Mapping[str, str]) -> str | None:
    """Return the key from `X-API-Key` or `Authorization: Bearer`, or None.

    `headers` must look names up case-insensitively, as Starlette's Headers do.
    """
    found = _presented(headers)
    return found[0] if found else None


def _presented(headers: Mapping[str, str]) -> tuple[str, Credential] | None:
    key = headers.get("x-api-key")
    if key and key.strip():
        return key.strip(), Credential.X_API_KEY
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip(), Credential.BEARER
    return None


def query_key_parameter(query: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """Return the first query parameter whose name clients use for API keys, or None."""
    for name, value in query:
        if name.lower().replace("-", "_") in QUERY_KEY_PARAMETERS:
            return name, value
    return None


def has_query_key(query_names: list[str]) -> bool:
    """Return whether any query parameter name is one that clients use for API keys."""
    return query_key_parameter([(name, "") for name in query_names]) is not None


def authenticate(
    keyring: KeyRing, headers: Mapping[str, str], query: Sequence[tuple[str, str]]
) -> Authentication:
    """Authenticate a request by its headers; a key-like query parameter rejects it first."""
    in_query = query_key_parameter(query)
    if in_query is not None:
        name, value = in_query
        return Authentication(
            reason=AuthReason.KEY_IN_QUERY,
            credential=Credential.QUERY,
            key_id=keyring.identify(value.strip()),
            parameter=name[:64],
        )
    found = _presented(headers)
    if found is None:
        return Authentication(reason=AuthReason.MISSING_KEY, credential=Credential.NONE)
    key, credential = found
    key_id = keyring.identify(key)
    if key_id is None:
        return Authentication(reason=AuthReason.INVALID_KEY, credential=credential)
    return Authentication(reason=AuthReason.AUTHENTICATED, credential=credential, key_id=key_id)
