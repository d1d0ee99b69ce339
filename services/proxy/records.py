"""One record per proxy decision, written to the audit stream and the log exactly once.

A decision is made when a request, a TLS connection or a DNS query arrives, but its bytes,
status and duration are known only when the exchange ends, so the record is kept open until
then. `finish` is idempotent; the filter closes every record still open when the client
disconnects, so no decision goes unrecorded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from libs.common import logs
from libs.common.audit import AuditPublisher
from libs.common.decisions import Decision
from libs.common.messages import AuditOutcome
from libs.common.sanitize import sanitize_line

logger = logging.getLogger(__name__)

SERVICE = "proxy"
MAX_HOST_CHARS = 260
MAX_PATH_CHARS = 512


def printable(text: str | None, max_length: int) -> str | None:
    """Return agent-supplied `text` escaped and cut to `max_length` for logs and audit."""
    if text is None:
        return None
    shown, _ = sanitize_line(text.encode("utf-8", "surrogateescape"), max_length=max_length)
    return shown


@dataclass
class DecisionRecord:
    """The proxy's decision for one exchange, and the traffic that followed it."""

    audit: AuditPublisher
    event_type: str
    agent_id: str | None
    mode: str
    protocol: str
    client: str
    decision: Decision
    host: str | None = None
    port: int | None = None
    method: str | None = None
    path: str | None = None
    upstream: str | None = None
    status: int | None = None
    bytes_from_agent: int = 0
    bytes_to_agent: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: bool = False

    def set_path(self, path: str) -> None:
        """Keep the path of a request without its query string, which may carry secrets."""
        self.path = printable(path.split("?", 1)[0].split("#", 1)[0], MAX_PATH_CHARS)

    def finish(self, *, status: int | None = None, decision: Decision | None = None) -> None:
        """Write the audit event and the log line; later calls do nothing."""
        if self.finished:
            return
        self.finished = True
        if status is not None:
            self.status = status
        if decision is not None:
            self.decision = decision
        duration_ms = round((time.monotonic() - self.started) * 1000, 3)
        details: dict[str, Any] = {
            "mode": self.mode,
            "protocol": self.protocol,
            "decision": "allow" if self.decision.allowed else "deny",
            "client": self.client,
            "host": printable(self.host, MAX_HOST_CHARS),
            "port": self.port,
            "method": printable(self.method, 32),
            "path": self.path,
            "upstream": self.upstream,
            "status": self.status,
            "bytes_from_agent": self.bytes_from_agent,
            "bytes_to_agent": self.bytes_to_agent,
            "duration_ms": duration_ms,
            "detail": printable(self.decision.detail, 300),
        }
        self.audit.emit(
            self.event_type,
            outcome=AuditOutcome.SUCCESS if self.decision.allowed else AuditOutcome.DENIED,
            actor=SERVICE,
            agent_id=self.agent_id,
            reason_code=str(self.decision.reason),
            details=details,
        )
        logger.info(
            "%s %s %s %s %s:%s%s status=%s in=%d out=%d %.1fms",
            self.event_type,
            details["decision"],
            self.decision.reason,
            details["method"] or "-",
            details["host"] or "-",
            self.port or "-",
            self.path or "",
            self.status,
            self.bytes_from_agent,
            self.bytes_to_agent,
            duration_ms,
            extra={logs.AGENT_ID: self.agent_id, logs.REASON: str(self.decision.reason)},
        )
