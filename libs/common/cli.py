"""The `agent-runner` command: API key management and reading the audit stream."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import nats.errors
import typer

from libs.common import bus
from libs.common.apikeys import (
    KEY_ID_PATTERN,
    generate_key,
    key_file_line,
    read_key_file,
)
from libs.common.errors import CommonError, ConfigurationError
from libs.common.messages import AUDIT_STREAM, AuditEvent
from libs.common.settings import CommonSettings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
audit_app = typer.Typer(no_args_is_help=True, help="Read the audit stream.")
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


def main() -> None:
    """Console entry point of `agent-runner`."""
    try:
        app()
    except (ConfigurationError, CommonError) as exc:
        print(f"agent-runner: {exc}", file=sys.stderr)
        sys.exit(2)
