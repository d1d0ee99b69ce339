"""Exceptions of the shared library.

NATS and Redis errors are translated into these at the adapter boundary, so services catch
one family of errors and never a client library's internals.
"""

from __future__ import annotations


class CommonError(Exception):
    """Base class of every error the shared library raises on purpose."""


class ConfigurationError(CommonError):
    """A setting is invalid; the message names the option, the value and the expectation."""


class BusError(CommonError):
    """A NATS operation failed; `subject` names where it was going."""

    def __init__(self, message: str, *, subject: str | None = None) -> None:
        super().__init__(message)
        self.subject = subject


class BusTimeout(BusError):
    """No service replied to a NATS request in time."""


class RemoteError(BusError):
    """The service that replied to a request reported an error with a fixed code."""

    def __init__(self, code: str, message: str, *, subject: str | None = None) -> None:
        super().__init__(f"{code}: {message}", subject=subject)
        self.code = code
        self.message = message


class StoreError(CommonError):
    """A Redis operation failed or returned data that does not validate."""
