"""Settings shared by every service, and the machinery for the per-service settings classes.

Each setting is both a command-line flag (`--nats-url`) and an environment variable
(`AGENT_RUNNER_NATS_URL`); flags win over the environment. The production profile is the
default and its defaults are the secure ones. The development profile changes only the
defaults listed in a class's `development_defaults`, and every service logs a warning naming
each relaxed setting at every start, so a relaxed deployment is never silent.
"""

from __future__ import annotations

import logging
import socket
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict, SettingsError

from libs.common.errors import ConfigurationError

logger = logging.getLogger(__name__)

ENV_PREFIX = "AGENT_RUNNER_"


class Profile(StrEnum):
    """Deployment profile; production keeps every secure default."""

    PRODUCTION = "production"
    DEVELOPMENT = "development"


class CommonSettings(BaseSettings):
    """Settings that every service reads: profile, identity, logging, NATS and Redis."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        cli_exit_on_error=False,
        validate_default=True,
    )

    # Maps a field name to the default it takes in the development profile. Only fields listed
    # here differ between the profiles.
    development_defaults: ClassVar[dict[str, Any]] = {}

    profile: Profile = Field(
        Profile.PRODUCTION,
        description="Deployment profile. 'production' keeps every secure default; 'development' "
        "relaxes the settings whose help says so and logs a warning at every start.",
    )
    host_id: str = Field(
        default_factory=socket.gethostname,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="Name of this host in NATS subjects and agent records (default: hostname).",
    )
    log_level: str = Field(
        "INFO",
        pattern=r"^(DEBUG|INFO|WARNING|ERROR)$",
        description="Minimum level of the JSON log lines written to standard error.",
    )
    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        pattern=r"^(nats|tls)://",
        description="NATS server URL (JetStream must be enabled). Keep it on loopback or a "
        "private network: agents must never reach it.",
    )
    nats_user: str | None = Field(None, description="NATS user name.")
    nats_password: SecretStr | None = Field(
        None, description="NATS password; prefer the environment variable to the flag."
    )
    nats_credentials_file: Path | None = Field(
        None, description="NATS .creds file (JWT and NKey seed), used instead of user/password."
    )
    nats_timeout: float = Field(
        5.0, gt=0, le=120, description="Seconds to wait for a NATS connect or reply."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        pattern=r"^rediss?://",
        description="Redis URL for agent state and counters. Put the password in "
        "--redis-password, not in the URL, so it is never logged.",
    )
    redis_password: SecretStr | None = Field(
        None, description="Redis password; prefer the environment variable to the flag."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_profile_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if str(data.get("profile", Profile.PRODUCTION)) != Profile.DEVELOPMENT:
            return data
        for name, value in cls.development_defaults.items():
            data.setdefault(name, value)
        return data

    @model_validator(mode="after")
    def _check_redis_url_has_no_password(self) -> Self:
        if "@" in self.redis_url:
            raise ValueError(
                "--redis-url must not contain credentials; pass the password with "
                "--redis-password or AGENT_RUNNER_REDIS_PASSWORD"
            )
        return self

    def relaxed_settings(self) -> dict[str, Any]:
        """Return the settings whose value is weaker than the production default."""
        if self.profile != Profile.DEVELOPMENT:
            return {}
        relaxed = {}
        for name, value in self.development_defaults.items():
            if getattr(self, name) == value:
                relaxed[name] = value
        return relaxed

    def warn_if_relaxed(self) -> None:
        """Log one warning per setting that the development profile relaxed."""
        for name, value in self.relaxed_settings().items():
            logger.warning(
                "development profile relaxes %s to %r; never use it for untrusted agents",
                name,
                value,
                extra={"setting": name},
            )

    def redacted(self) -> dict[str, Any]:
        """Return the effective settings with every secret replaced by a marker."""
        values = self.model_dump(mode="json")
        for name, value in self:
            if isinstance(value, SecretStr):
                values[name] = "<redacted>" if value.get_secret_value() else ""
        return values


SettingsT = TypeVar("SettingsT", bound=CommonSettings)


def load_settings(settings_class: type[SettingsT], argv: list[str] | None = None) -> SettingsT:
    """Parse flags and environment into `settings_class`.

    Raises ConfigurationError naming the option and value when anything is invalid, so a
    service stops at startup instead of running with a half-understood configuration.
    """
    try:
        return CliApp.run(settings_class, cli_args=argv if argv is not None else [])
    except SettingsError as exc:
        # A command line that cannot be parsed, such as an unknown flag or a flag without a value.
        raise ConfigurationError(f"invalid settings: {exc}") from exc
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from exc


def _describe(error: ErrorDetails) -> str:
    if not error["loc"]:
        # A model validator checks several settings together. Its input is every setting,
        # secrets included, so only its message is shown, and that message names the options.
        return error["msg"].removeprefix("Value error, ")
    option = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
    return f"{option}={error.get('input')!r}: {error['msg']}"


class SandboxProxySettings(CommonSettings):
    """The sandbox network and the proxy ports on its gateway, which netguard and the proxy share.

    Both services must agree on these values, so they read the same flags and variables.
    """

    sandbox_subnet: IPv4Network = Field(
        IPv4Network("172.30.0.0/16"),
        description="Subnet of the sandbox network; keep it equal to the supervisor's.",
    )
    sandbox_gateway: IPv4Address | None = Field(
        None,
        description="Address of the host on the sandbox bridge, where the proxy listens "
        "(default: the first address of --sandbox-subnet, as Docker assigns it).",
    )
    proxy_transparent_port: int = Field(
        15001,
        ge=1,
        le=65535,
        description="Proxy port of the transparent mode, to which netguard redirects agents' "
        "TCP 80 and 443.",
    )
    proxy_dns_port: int = Field(
        15053,
        ge=1,
        le=65535,
        description="Proxy port of the DNS filter, to which netguard redirects agents' UDP and "
        "TCP 53.",
    )
    proxy_explicit_port: int = Field(
        15080,
        ge=1,
        le=65535,
        description="Proxy port of the explicit HTTP proxy (HTTP_PROXY, CONNECT), which agents "
        "may connect to directly.",
    )

    @model_validator(mode="after")
    def _check_sandbox_network(self) -> Self:
        gateway = self.gateway_address
        if gateway not in self.sandbox_subnet or gateway in (
            self.sandbox_subnet.network_address,
            self.sandbox_subnet.broadcast_address,
        ):
            raise ValueError(
                f"--sandbox-gateway {gateway} is not a host address of --sandbox-subnet "
                f"{self.sandbox_subnet}"
            )
        ports = {self.proxy_transparent_port, self.proxy_dns_port, self.proxy_explicit_port}
        if len(ports) != 3:
            raise ValueError("the three --proxy-*-port settings must be different ports")
        return self

    @property
    def gateway_address(self) -> IPv4Address:
        """The host's address on the sandbox bridge."""
        return self.sandbox_gateway or next(self.sandbox_subnet.hosts())
