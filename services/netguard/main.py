"""Entry point of agent-runner-netguard, the nftables firewall of the sandbox network.

Not built yet: the command exits with an error instead of pretending to run, so no deployment
can believe it is protected by a service that does nothing.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `agent-runner-netguard`; exits with status 2."""
    print(
        "agent-runner-netguard: not implemented in this version; "
        "the nftables firewall of the sandbox network does not exist yet",
        file=sys.stderr,
    )
    sys.exit(2)
