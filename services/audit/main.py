"""Entry point of agent-runner-audit, the audit sink that writes signed, hash-chained audit files.

Not built yet: the command exits with an error instead of pretending to run, so no deployment
can believe it is protected by a service that does nothing.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `agent-runner-audit`; exits with status 2."""
    print(
        "agent-runner-audit: not implemented in this version; "
        "the audit sink that writes signed, hash-chained audit files does not exist yet",
        file=sys.stderr,
    )
    sys.exit(2)
