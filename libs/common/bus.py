"""NATS helpers: connect with credentials, request/reply with schema validation, JetStream.

Every service reaches the others only through these functions, so NATS errors are translated
into `BusError` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from pydantic import BaseModel, ValidationError

from libs.common import logs
from libs.common.errors import BusError, BusTimeout, RemoteError
from libs.common.messages import (
    AUDIT_STREAM,
    AUDIT_SUBJECTS,
    ErrorReply,
    Message,
)
from libs.common.settings import CommonSettings

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

# Server-side window in which a repeated Nats-Msg-Id is dropped, so a publisher's retry of an
# audit event that did reach the stream is not stored twice.
AUDIT_DUPLICATE_WINDOW_SECONDS = 120.0


async def connect(settings: CommonSettings, *, name: str) -> NatsClient:
    """Connect to NATS with the configured credentials and reconnect forever on loss.

    Raises BusError when the first connection fails, naming the URL (never the password).
    """

    connected: list[NatsClient] = []

    async def on_disconnected() -> None:
        if connected and (connected[0].is_closed or connected[0].is_draining):
            return  # our own close or drain, not a lost connection
        logger.warning("disconnected from NATS at %s; reconnecting", settings.nats_url)

    async def on_reconnected() -> None:
        logger.info("reconnected to NATS at %s", settings.nats_url)

    async def on_error(exc: Exception) -> None:
        logger.error("NATS client error: %s", exc)

    options: dict[str, Any] = {
        "servers": [settings.nats_url],
        "name": name,
        "connect_timeout": settings.nats_timeout,
        "reconnect_time_wait": 1,
        "max_reconnect_attempts": -1,
        "allow_reconnect": True,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "error_cb": on_error,
    }
    if settings.nats_credentials_file is not None:
        options["user_credentials"] = str(settings.nats_credentials_file)
    elif settings.nats_user is not None:
        options["user"] = settings.nats_user
        if settings.nats_password is not None:
            options["password"] = settings.nats_password.get_secret_value()
    try:
        # nats-py retries a failed first connection forever when reconnecting is allowed; a
        # service must instead stop at startup and log why.
        client = await asyncio.wait_for(nats.connect(**options), settings.nats_timeout * 2)
    except Exception as exc:  # nats-py raises several unrelated types on connect
        raise BusError(
            f"cannot connect to NATS at {settings.nats_url!r}: {exc}; check --nats-url, "
            "the credentials and that nats-server runs with JetStream (-js)"
        ) from exc
    connected.append(client)
    logger.info("connected to NATS at %s as %s", settings.nats_url, name)
    return client


def encode(message: BaseModel) -> bytes:
    """Serialise a message model to its JSON wire form."""
    return message.model_dump_json().encode()


def decode(data: bytes, model: type[ModelT], *, subject: str | None = None) -> ModelT:
    """Parse and validate a payload; raises BusError naming the subject when it does not fit."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise _invalid(model, subject, exc) from exc


def validate(payload: Any, model: type[ModelT], *, subject: str | None = None) -> ModelT:
    """Validate an already parsed payload; raises BusError like `decode`."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(model, subject, exc) from exc


def _invalid(model: type[BaseModel], subject: str | None, exc: ValidationError) -> BusError:
    return BusError(
        f"invalid {model.__name__} on {subject!r}: {exc.error_count()} error(s), first: "
        f"{exc.errors()[0]['msg']}",
        subject=subject,
    )


async def request(
    client: NatsClient,
    subject: str,
    message: Message,
    reply_model: type[ModelT],
    *,
    timeout: float,
) -> ModelT:
    """Send `message` and return the validated reply.

    Raises BusTimeout when no service replies within `timeout` seconds, RemoteError when the
    responder sent an ErrorReply, and BusError for anything else.
    """
    try:
        response = await client.request(subject, encode(message), timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise BusTimeout(f"no reply on {subject!r} within {timeout:g} s", subject=subject) from exc
    except nats.errors.Error as exc:
        raise BusError(f"request on {subject!r} failed: {exc}", subject=subject) from exc
    try:
        payload = json.loads(response.data)
    except ValueError as exc:
        raise BusError(f"reply on {subject!r} is not JSON", subject=subject) from exc
    if isinstance(payload, dict) and payload.get("kind") == "error":
        error = validate(payload, ErrorReply, subject=subject)
        raise RemoteError(error.code, error.message, subject=subject)
    return validate(payload, reply_model, subject=subject)


async def respond(msg: Msg, message: BaseModel) -> None:
    """Reply to a request; a requester that already gave up is logged, not raised."""
    if not msg.reply:
        logger.warning("request on %s has no reply subject", msg.subject)
        return
    try:
        await msg.respond(encode(message))
    except nats.errors.Error as exc:
        logger.error("cannot reply on %s: %s", msg.subject, exc, extra={logs.SUBJECT: msg.subject})


async def ensure_audit_stream(client: NatsClient) -> JetStreamContext:
    """Create the audit stream when it is missing and return a JetStream context.

    Raises BusError when JetStream is not enabled on the server.
    """
    jetstream = client.jetstream()
    try:
        await jetstream.stream_info(AUDIT_STREAM)
    except nats.js.errors.NotFoundError:
        config = StreamConfig(
            name=AUDIT_STREAM,
            subjects=[AUDIT_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=AUDIT_DUPLICATE_WINDOW_SECONDS,
        )
        try:
            await jetstream.add_stream(config)
        except nats.js.errors.Error as exc:
            raise BusError(f"cannot create stream {AUDIT_STREAM!r}: {exc}") from exc
        logger.info("created JetStream stream %s for %s", AUDIT_STREAM, AUDIT_SUBJECTS)
    except (nats.js.errors.Error, nats.errors.Error) as exc:
        raise BusError(f"JetStream is not available: {exc}; start nats-server with -js") from exc
    return jetstream
