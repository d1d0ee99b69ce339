"""Gateway entry point: load settings and keys, then serve with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from libs.common import logs
from libs.common.errors import ConfigurationError
from libs.common.settings import load_settings
from services.api.app import SERVICE, create_app
from services.api.auth import KeyRing
from services.api.settings import ApiSettings

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `agent-runner-api`."""
    try:
        settings = load_settings(ApiSettings, sys.argv[1:] if argv is None else argv)
        keyring = KeyRing.load(
            key_file=settings.api_keys_file,
            plain_keys=settings.api_keys.get_secret_value() if settings.api_keys else None,
        )
    except ConfigurationError as exc:
        print(f"agent-runner-api: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure_logging(service=SERVICE, host=settings.host_id, level=settings.log_level)
    app = create_app(settings, keyring=keyring)
    uvicorn.run(
        app,
        host=str(settings.listen_address),
        port=settings.listen_port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        limit_concurrency=2000,
        timeout_keep_alive=5,
    )
