"""Settings of the audit sink: where it writes, how it signs, and how long it keeps records."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import ByteSize, Field, model_validator

from libs.common.settings import CommonSettings, Profile

MIB = 1024 * 1024
KEYGEN_HINT = (
    "create a key with `agent-runner audit keygen /etc/agent-runner/audit-signing.pem` and pass "
    "it with --audit-signing-key or AGENT_RUNNER_AUDIT_SIGNING_KEY"
)


class AuditSettings(CommonSettings):
    """Everything the audit sink needs to consume the AUDIT stream and write signed files."""

    development_defaults: ClassVar[dict[str, Any]] = {"audit_generate_key": True}

    audit_dir: Path = Field(
        Path("/var/lib/agent-runner/audit"),
        description="Folder of the audit segments and the verification key. Give it to no "
        "other writer: the sink is the only process that may append to it.",
    )
    audit_signing_key: Path | None = Field(
        None,
        description="Ed25519 private key (unencrypted PKCS#8 PEM, mode 600) that signs the "
        "checkpoints. Required by the production profile. Keep it off the machine's backups "
        "of --audit-dir, because anyone with a copy can forge a log.",
    )
    audit_generate_key: bool = Field(
        False,
        description="UNSAFE: when --audit-signing-key is not set, create the key in "
        "--audit-dir/audit-signing.pem, next to the log it protects, so anyone who can edit "
        "the log can also re-sign it. On by default in the development profile; rejected by "
        "the production profile.",
    )
    audit_checkpoint_interval: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Maximum seconds between signed checkpoints while events arrive; records "
        "after the newest checkpoint are not signed yet.",
    )
    audit_segment_max_bytes: ByteSize = Field(
        ByteSize(64 * MIB),
        ge=4096,
        description="Size in bytes (suffixes such as 64MiB accepted) after which a segment is "
        "closed with a checkpoint and a new one started. Retention deletes whole segments, so "
        "this is its granularity.",
    )
    audit_retention_days: float = Field(
        0,
        ge=0,
        description="Delete closed segments older than this many days; 0 keeps every age.",
    )
    audit_max_size: ByteSize = Field(
        ByteSize(0),
        ge=0,
        description="Delete the oldest closed segments while the folder exceeds this many "
        "bytes (suffixes such as 10GiB accepted); 0 sets no limit. The segment being written "
        "is never deleted.",
    )
    audit_consumer: str = Field(
        "audit-sink",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Name of the durable JetStream consumer; each sink that keeps its own "
        "copy of the log needs its own name.",
    )
    audit_batch_size: int = Field(
        1000,
        ge=1,
        le=10_000,
        description="Maximum events written per fsync; larger batches raise throughput and "
        "the delay before an event is acknowledged.",
    )
    audit_recent_ids: int = Field(
        100_000,
        ge=1000,
        description="Number of newest event ids remembered to drop events that arrive twice.",
    )

    @model_validator(mode="after")
    def _check_key(self) -> Self:
        if self.audit_generate_key and self.profile == Profile.PRODUCTION:
            raise ValueError(
                "--audit-generate-key is rejected by the production profile: a key next to "
                f"the log cannot protect it; {KEYGEN_HINT}"
            )
        if self.audit_signing_key is None and not self.audit_generate_key:
            raise ValueError(f"--audit-signing-key is required; {KEYGEN_HINT}")
        return self

    @property
    def signing_key_path(self) -> Path:
        """The configured key file, or the generated one in the audit folder."""
        return self.audit_signing_key or self.audit_dir / "audit-signing.pem"
