"""JSON logging for every service.

Each line is one JSON object with the service name, the host and the correlation id of the
request being handled, so one id finds a request in every service's log, in audit records and
in NATS messages. Modules log through `logging.getLogger(__name__)` and pass ids as `extra`
fields named by the constants below.
"""

from __future__ import annotations

import contextvars
import faulthandler
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# Field names used in `extra={...}`; shared so that log queries work across services.
AGENT_ID = "agent_id"
CONTAINER_ID = "container_id"
CORRELATION_ID = "correlation_id"
IMAGE_DIGEST = "image_digest"
IMAGE_ID = "image_id"
REASON = "reason"
SUBJECT = "subject"
KEY_ID = "key_id"
CLIENT = "client"

_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "correlation_id", default=None
)


def current_correlation_id() -> str | None:
    """Return the correlation id bound to the running task, if any."""
    return _correlation_id.get()


@contextmanager
def correlation_scope(correlation_id: str | None) -> Iterator[None]:
    """Bind `correlation_id` to every log line written inside the block."""
    token = _correlation_id.set(correlation_id)
    try:
        yield
    finally:
        _correlation_id.reset(token)


class _ContextFilter(logging.Filter):
    def __init__(self, service: str, host: str) -> None:
        super().__init__()
        self.service = service
        self.host = host

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.host = self.host
        if not hasattr(record, CORRELATION_ID):
            record.correlation_id = _correlation_id.get()
        return True


def configure_logging(*, service: str, host: str, level: str = "INFO") -> None:
    """Send JSON lines to standard error for this process, replacing any earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
            timestamp=False,
        )
    )
    handler.addFilter(_ContextFilter(service, host))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # libnftables ends the process with abort() on some internal assertions, which would
    # leave no trace in the log. This prints every thread's Python stack to standard error
    # on SIGABRT, SIGSEGV, SIGFPE, SIGBUS and SIGILL.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    # Client libraries log wire detail at INFO; keep their lifecycle warnings only.
    for noisy in ("httpx", "httpcore", "docker", "urllib3", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
