"""The `agent-runner` command: API key management, the audit stream and the audit files."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import nats.errors
import typer

from libs.common import audit_tail, bus
from libs.common.apikeys import (
    KEY_ID_PATTERN,
    generate_key,
    key_file_line,
    read_key_file,
)
from libs.common.audit_records import (
    PUBLIC_KEY_PATTERN,
    generate_signing_key,
    load_public_key,
    write_public_key,
)
from libs.common.audit_verify import VerificationError, verify_directory
from libs.common.errors import CommonError, ConfigurationError
from libs.common.messages import AUDIT_STREAM, AuditEvent
from libs.common.settings import CommonSettings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
audit_app = typer.Typer(
    no_args_is_help=True, help="Read the audit stream, and verify and read the audit files."
)
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")

KeyFile = Annotated[Path, typer.Option("--file", help="API key file of the gateway.")]


def _fail(message: str) -> NoReturn:
    typer.echo(f"agent-runner: {message}", err=True)
    raise typer.Exit(2)


@keys_app.command("create")
def create_key(
    file: KeyFile,
    key_id: Annotated[str, typer.Option("--id", help="Public name of the new key.")],
) -> None:
    """Add a new key to FILE and print it once; only its hash is stored."""
    if not KEY_ID_PATTERN.fullmatch(key_id):
        _fail(f"key id {key_id!r} is invalid; use 1-64 letters, digits, '.', '_' or '-'")
    existing = read_key_file(file) if file.exists() else []
    if any(key.key_id == key_id for key in existing):
        _fail(f"key id {key_id!r} already exists in {file}; revoke it first or pick another")
    key = generate_key()
    file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "a") as output:
        output.write(key_file_line(key_id, key) + "\n")
    typer.echo(key)


@keys_app.command("list")
def list_keys(file: KeyFile) -> None:
    """Print the id of every key in FILE."""
    for key in read_key_file(file):
        typer.echo(key.key_id)


@keys_app.command("revoke")
def revoke_key(
    file: KeyFile,
    key_id: Annotated[str, typer.Option("--id", help="Key to revoke.")],
) -> None:
    """Remove a key from FILE; a running gateway keeps it until restarted."""
    try:
        lines = file.read_text().splitlines()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror}")
    kept = [line for line in lines if not line.startswith(f"{key_id}:")]
    if len(kept) == len(lines):
        _fail(f"no key with id {key_id!r} in {file}")
    temporary = file.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as output:
        output.write("".join(line + "\n" for line in kept))
    temporary.replace(file)
    typer.echo(f"revoked {key_id}; restart the gateway to apply")


@audit_app.command("events")
def audit_events(
    agent_id: Annotated[str | None, typer.Option(help="Only events of this agent.")] = None,
    limit: Annotated[int, typer.Option(help="Maximum number of events to print.", min=1)] = 1000,
) -> None:
    """Print audit events from the JetStream stream as JSON lines, oldest first.

    Connection settings come from the AGENT_RUNNER_* environment, as for the services.
    """
    settings = load_settings(CommonSettings, [])
    for event in asyncio.run(_read_events(settings, limit=limit)):
        if agent_id is None or event.agent_id == agent_id:
            typer.echo(event.model_dump_json())


async def _read_events(settings: CommonSettings, *, limit: int) -> list[AuditEvent]:
    client = await bus.connect(settings, name="agent-runner-cli")
    try:
        jetstream = client.jetstream()
        subscription = await jetstream.subscribe(
            "audit.>", stream=AUDIT_STREAM, ordered_consumer=True
        )
        events: list[AuditEvent] = []
        while len(events) < limit:
            try:
                message = await subscription.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                break
            events.append(bus.decode(message.data, AuditEvent, subject=message.subject))
        await subscription.unsubscribe()
        return events
    finally:
        await client.close()


AuditDir = Annotated[
    Path, typer.Argument(help="Folder of the audit segments (the sink's --audit-dir).")
]


@audit_app.command("verify")
def audit_verify(
    directory: AuditDir,
    key: Annotated[
        list[Path] | None,
        typer.Option(
            help="Trusted verification key (PEM); repeat for rotated keys. Default: the "
            "audit-key-*.pub files in DIR, which only prove anything if DIR is trusted."
        ),
    ] = None,
    allow_unsigned_tail: Annotated[
        bool,
        typer.Option(help="Accept records after the last checkpoint, as in a live log."),
    ] = False,
    witness: Annotated[
        list[str] | None,
        typer.Option(
            help="SEQ:SHA256 of a record that must be in the log, as in the sink's 'wrote "
            "<reason> checkpoint SEQ:SHA256' log lines; repeatable."
        ),
    ] = None,
) -> None:
    """Check the hash chain and the signed checkpoints of DIR; exit 1 at the first bad record."""
    paths = key or sorted(directory.glob(PUBLIC_KEY_PATTERN))
    if not paths:
        _fail(f"no verification key: pass --key, or keep the audit-key-*.pub files in {directory}")
    if not key:
        typer.echo(
            f"warning: using the verification keys stored in {directory}; pass --key with a "
            "copy kept elsewhere to detect a log re-signed with another key",
            err=True,
        )
    witnesses = _parse_witnesses(witness or [])
    try:
        keys = [load_public_key(path) for path in paths]
        report = verify_directory(
            directory, keys, allow_unsigned_tail=allow_unsigned_tail, witnesses=witnesses
        )
    except VerificationError as exc:
        typer.echo(f"agent-runner: audit log invalid: {exc}", err=True)
        raise typer.Exit(1) from exc
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    start = "the first record" if report.complete else f"retained seq {report.first_seq}"
    typer.echo(
        f"ok: {report.records} records in {report.segments} segment(s), from {start} to seq "
        f"{report.last_seq}; last checkpoint at seq {report.last_checkpoint_seq}, "
        f"{report.unsigned_tail} record(s) after it"
    )


def _parse_witnesses(values: list[str]) -> dict[int, str]:
    witnesses = {}
    for value in values:
        seq, _, digest = value.partition(":")
        if not seq.isdigit() or re.fullmatch(r"[0-9a-f]{64}", digest) is None:
            _fail(f"--witness {value!r} is invalid; expected SEQ:SHA256 (64 lowercase hex digits)")
        witnesses[int(seq)] = digest
    return witnesses


@audit_app.command("tail")
def audit_tail_command(
    directory: AuditDir,
    lines: Annotated[int, typer.Option(help="Number of newest records to print.", min=0)] = 20,
    follow: Annotated[bool, typer.Option(help="Keep printing records as they are written.")] = (
        False
    ),
) -> None:
    """Print the newest records of DIR, one safe line each (escape sequences are shown)."""
    if not directory.is_dir():
        _fail(f"audit folder {str(directory)!r} does not exist")
    records, segment, offset = audit_tail.last_lines(directory, lines)
    for raw in records:
        typer.echo(audit_tail.format_record(raw))
    if follow:
        try:
            for raw in audit_tail.follow(directory, segment, offset):
                typer.echo(audit_tail.format_record(raw))
        except KeyboardInterrupt:
            return


@audit_app.command("keygen")
def audit_keygen(
    file: Annotated[Path, typer.Argument(help="Private key file to create (mode 600).")],
) -> None:
    """Create an Ed25519 signing key for --audit-signing-key and its .pub verification key."""
    try:
        signer = generate_signing_key(file)
    except FileExistsError:
        _fail(f"{file} exists; the sink's key is never overwritten, pick another name")
    except OSError as exc:
        _fail(f"cannot create {file}: {exc.strerror}")
    public = write_public_key(file.parent, signer.public_key)
    typer.echo(f"created {file} (key id {signer.key_id}); verification key: {public}")


def main() -> None:
    """Console entry point of `agent-runner`."""
    try:
        app()
    except (ConfigurationError, CommonError) as exc:
        print(f"agent-runner: {exc}", file=sys.stderr)
        sys.exit(2)
