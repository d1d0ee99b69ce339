"""Exceptions raised by the supervisor.

Every failure that ends an agent start carries a fixed reason code, because the same code goes
to the API caller, the audit trail, the logs and the tests. Docker and HTTP errors are
translated into these at the adapter boundary.
"""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    """Fixed reason codes for a rejected image or a failed agent."""

    # Download
    DOWNLOAD_FAILED = "download_failed"
    DOWNLOAD_TIMEOUT = "download_timeout"
    DOWNLOAD_TOO_LARGE = "download_too_large"
    DOWNLOAD_HTTP_STATUS = "download_http_status"
    URL_NOT_ALLOWED = "url_not_allowed"
    DIGEST_MISMATCH = "digest_mismatch"
    # Image sources, checked for the URL and for every redirect before any connection
    SOURCE_NOT_TRUSTED = "source_not_trusted"
    SOURCE_ADDRESS_DENIED = "source_address_denied"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    # Signature, checked after the digest when a signing key or trusted root is configured
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_INVALID = "signature_invalid"
    SIGNER_NOT_TRUSTED = "signer_not_trusted"
    SIGNATURE_DIGEST_MISMATCH = "signature_digest_mismatch"
    # Tarball structure, checked before `docker load`
    NOT_A_TAR = "not_a_tar"
    TOO_MANY_MEMBERS = "too_many_members"
    TARBALL_TOO_LARGE = "tarball_too_large"
    UNSAFE_MEMBER_NAME = "unsafe_member_name"
    DUPLICATE_MEMBER = "duplicate_member"
    LINK_MEMBER = "link_member"
    SPECIAL_MEMBER = "special_member"
    UNEXPECTED_MEMBER = "unexpected_member"
    MANIFEST_MISSING = "manifest_missing"
    MANIFEST_INVALID = "manifest_invalid"
    MULTIPLE_IMAGES = "multiple_images"
    MISSING_LAYER = "missing_layer"
    MISSING_CONFIG = "missing_config"
    CONFIG_INVALID = "config_invalid"
    CONFIG_DIGEST_MISMATCH = "config_digest_mismatch"
    RETAG_EXISTING_IMAGE = "retag_existing_image"
    # A header inside a layer's tar archive: see services/supervisor/layer_entries.py
    LAYER_ENTRY_INVALID = "layer_entry_invalid"
    # Image configuration
    WORKDIR_RELATIVE = "workdir_relative"
    WORKDIR_FORBIDDEN = "workdir_forbidden"
    VOLUMES_DECLARED = "volumes_declared"
    NO_COMMAND = "no_command"
    # Load and run
    LOAD_FAILED = "load_failed"
    IMAGE_ID_MISMATCH = "image_id_mismatch"
    CREATE_FAILED = "create_failed"
    START_FAILED = "start_failed"
    EXITED_BEFORE_READY = "exited_before_ready"
    READY_TIMEOUT = "ready_timeout"
    CAPACITY_EXHAUSTED = "capacity_exhausted"
    FIREWALL_NOT_VERIFIED = "firewall_not_verified"
    SUPERVISOR_RESTARTED = "supervisor_restarted"
    CONTAINER_MISSING = "container_missing"
    INTERNAL_ERROR = "internal_error"


class SupervisorError(Exception):
    """Base class of every error the supervisor raises on purpose."""


class AgentStartError(SupervisorError):
    """An agent could not be started; `reason` is the fixed code, `message` the detail."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


class ImageRejected(AgentStartError):
    """The image tarball or its configuration failed a check; nothing was loaded."""


class DockerUnavailable(SupervisorError):
    """The Docker daemon could not be reached or refused a request."""
