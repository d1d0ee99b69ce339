"""schemathesis hooks file with the checks that the gateway's schema run adds.

`schemathesis run` loads this file by path (the `hooks` option of its config file), so it
imports nothing from the test packages.

The passthrough relays the agent's status as it is, so a 5xx there can be the agent's own
and no fault of the gateway. `not_a_server_error` is off for those operations, and
`no_gateway_server_error` fails only on a 5xx that the gateway itself generated, which carries
its error body: `{"error": {"code": ...}, "request_id": ...}`.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from schemathesis import Case, CheckContext, Response

PASSTHROUGH_OPERATION_PREFIX = "passthrough_"


def gateway_error_code(body: bytes) -> str | None:
    """Return the `error.code` of a gateway error body, or None for any other body."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict) or "request_id" not in document:
        return None
    error = document.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return None
    code: str = error["code"]
    return code


@schemathesis.check
def no_gateway_server_error(ctx: CheckContext, response: Response, case: Case[Any]) -> None:
    """Fail on a passthrough 5xx that the gateway generated rather than relayed."""
    operation_id = str(case.operation.definition.raw.get("operationId", ""))
    if not operation_id.startswith(PASSTHROUGH_OPERATION_PREFIX) or response.status_code < 500:
        return
    code = gateway_error_code(response.content)
    if code is not None:
        raise AssertionError(
            f"the gateway returned {response.status_code} {code!r} on {case.operation.label}"
        )
