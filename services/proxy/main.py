"""Entry point of agent-runner-proxy, the filtering egress proxy.

Not built yet: the command exits with an error instead of pretending to run, so no deployment
can believe it is protected by a service that does nothing.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `agent-runner-proxy`; exits with status 2."""
    print(
        "agent-runner-proxy: not implemented in this version; "
        "the filtering egress proxy does not exist yet",
        file=sys.stderr,
    )
    sys.exit(2)
