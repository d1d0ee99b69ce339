"""API-key authentication of the gateway.

Keys are accepted only in `X-API-Key` or `Authorization: Bearer`: a key in a URL ends up in
proxy and access logs, so a request carrying one in the query string is rejected even when
the key is right. Keys are kept as SHA-256 hashes; API keys are long random strings, so a
fast hash is enough and a stolen key file does not reveal them. Every stored hash is compared
with `hmac.compare_digest`, so the time taken does not depend on which key, if any, matched.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from pathlib import Path

from libs.common.apikeys import StoredKey, hash_key, read_key_file
from libs.common.errors import ConfigurationError

logger = logging.getLogger(__name__)

QUERY_KEY_PARAMETERS = frozenset({"apikey", "api_key", "key", "token", "access_token"})
_MAX_KEY_LENGTH = 256


class KeyRing:
    """The set of API keys the gateway accepts."""

    def __init__(self, keys: list[StoredKey]) -> None:
        self._keys = list(keys)

    def __len__(self) -> int:
        return len(self._keys)

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
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def has_query_key(query_names: list[str]) -> bool:
    """Return whether any query parameter name is one that clients use for API keys."""
    return any(name.lower() in QUERY_KEY_PARAMETERS for name in query_names)
