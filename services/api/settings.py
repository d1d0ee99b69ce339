"""Gateway settings: listening address, TLS, API keys, rate limits, timeouts and body limits."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import ByteSize, Field, SecretStr, model_validator

from libs.common.errors import ConfigurationError
from libs.common.settings import CommonSettings
from services.api.forwarded import ForwardedHeader
from services.api.ratelimit import DEFAULT_KEY_PREFIX

MIB = 1024 * 1024
# Shortest --metrics-api-key accepted; secrets.token_urlsafe(32) returns 43 characters.
MIN_METRICS_KEY_LENGTH = 32


class ApiSettings(CommonSettings):
    """Everything the REST gateway needs; agent limits themselves are the supervisor's."""

    development_defaults: ClassVar[dict[str, Any]] = {
        "allow_http_image_urls": True,
        "insecure_http": True,
    }

    listen_address: IPv4Address = Field(
        IPv4Address("127.0.0.1"),
        description="Address the gateway listens on. Without --tls-cert, keep it on loopback "
        "behind a reverse proxy that terminates TLS.",
    )
    listen_port: int = Field(8080, ge=1, le=65535, description="TCP port of the gateway.")
    tls_cert: Path | None = Field(
        None,
        description="PEM file with the gateway's certificate followed by its intermediate CA "
        "certificates, such as certbot's fullchain.pem. With --tls-key the gateway serves "
        "HTTPS only, and reloads both files on SIGHUP and when they change.",
    )
    tls_key: Path | None = Field(
        None,
        description="PEM file with the unencrypted private key of --tls-cert, such as "
        "certbot's privkey.pem; make it readable by the gateway's user only.",
    )
    tls_check_interval: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds between checks of --tls-cert and --tls-key for changes. A change "
        "is loaded once both files have stayed the same for one more interval.",
    )
    http_redirect_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of a plain HTTP listener on --listen-address that responds to every "
        "request with a 308 redirect to the same path and query on "
        "https://<--public-host>:<--public-port> and serves nothing else. Needs TLS.",
    )
    public_host: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$",
        description="Host name (lower-case ASCII, IDNA for other names) or IPv4 address that "
        "clients use to reach the gateway, which its certificate names. Redirects from "
        "--http-redirect-port go there, never to the request's Host header.",
    )
    public_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="HTTPS port that clients connect to, when a port forward makes it differ "
        "from --listen-port (default: --listen-port).",
    )
    insecure_http: bool = Field(
        False,
        description="Serve plain HTTP when --tls-cert is not given, so API keys and agent "
        "traffic cross the network unencrypted. The production profile does not start "
        "without TLS unless this is set, and logs a warning at every start when it is. Use it "
        "only on loopback behind a reverse proxy that terminates TLS. Development profile: "
        "true.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of hashed API keys, one '<key id>:sha256:<hex>' line each, as "
        "written by 'agent-runner keys create'.",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated plain API keys, for setups without a key file; prefer "
        "the environment variable to the flag, which other users can see in the process list.",
    )
    request_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds the gateway waits for an agent to connect, respond or send more "
        "of its response when forwarding a request.",
    )
    max_request_body: ByteSize = Field(
        ByteSize(64 * 1024),
        description="Largest body of a control request such as POST /v1/agents (bytes).",
    )
    max_passthrough_body: ByteSize = Field(
        ByteSize(10 * MIB), description="Largest request body forwarded to an agent (bytes)."
    )
    max_passthrough_response: ByteSize = Field(
        ByteSize(100 * MIB),
        description="Largest agent response forwarded to the caller (bytes); a longer one is "
        "cut off and the connection closed.",
    )
    max_container_lifetime: int = Field(
        3600,
        gt=0,
        le=7 * 24 * 3600,
        description="Maximum lifetime a request may ask for, in seconds; keep it equal to the "
        "supervisor's --max-container-lifetime.",
    )
    start_wait_timeout: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="Seconds POST /v1/agents?wait=true waits for the agent to be ready.",
    )
    max_listed_agents: int = Field(
        1000, gt=0, le=100_000, description="Most agents GET /v1/agents returns."
    )
    allow_http_image_urls: bool = Field(
        False,
        description="Accept plain http:// image URLs. Development profile: true. Keep it equal "
        "to the supervisor's setting.",
    )

    # Rate limits and client addresses (services/api/ratelimit.py, services/api/forwarded.py)
    rate_limit: float = Field(
        20.0,
        gt=0,
        le=1_000_000,
        description="Requests per second that each client address and each API key may make "
        "on average, counted in Redis across every gateway process. Over it, requests get 429.",
    )
    rate_limit_burst: int = Field(
        100,
        ge=1,
        le=1_000_000,
        description="Requests that a client address or an API key may make at once before "
        "--rate-limit applies (the size of its token bucket).",
    )
    global_rate_limit: float = Field(
        500.0,
        gt=0,
        le=1_000_000,
        description="Authenticated requests per second that the whole gateway accepts on "
        "average, whatever their address and key; it protects the supervisors and Redis.",
    )
    global_rate_limit_burst: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Authenticated requests that the whole gateway accepts at once before "
        "--global-rate-limit applies.",
    )
    auth_failure_rate_limit: float = Field(
        1.0,
        gt=0,
        le=1_000_000,
        description="Failed authentications per second that a client address may make on "
        "average. Once over it, every request from that address gets 429 until it is under "
        "again, so it also slows down key guessing.",
    )
    auth_failure_rate_limit_burst: int = Field(
        30,
        ge=1,
        le=1_000_000,
        description="Failed authentications that a client address may make at once before "
        "--auth-failure-rate-limit applies.",
    )
    trusted_proxies: list[IPv4Network | IPv6Network] = Field(
        default_factory=list,
        description="Networks (CIDR) of reverse proxies whose --forwarded-header names the "
        "client. Requests from any other peer are counted by their own address, whatever "
        "headers they send. List only proxies that set or append that header themselves, "
        "or a client can choose its own address. In the environment, a JSON list.",
    )
    forwarded_header: ForwardedHeader = Field(
        ForwardedHeader.X_FORWARDED_FOR,
        description="The one header in which --trusted-proxies pass on the client address: "
        "'x-forwarded-for', 'forwarded' (RFC 7239) or 'x-real-ip'. The other two are ignored.",
    )
    rate_limit_key_prefix: str = Field(
        DEFAULT_KEY_PREFIX,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of the rate-limit keys in Redis. Gateways with the same prefix "
        "share their buckets, which is what several processes of one deployment need.",
    )

    # Metrics (services/api/metrics.py)
    metrics_api_key: SecretStr | None = Field(
        None,
        description="Secret that GET /metrics on the gateway's port requires, in the "
        "X-Metrics-Key header or as Authorization: Bearer; at least 32 characters and "
        "different from every API key. API keys do not open /metrics. Prefer the environment "
        "variable to the flag, which other users can see in the process list. Without this "
        "and without --metrics-bind, the gateway serves no metrics.",
    )
    metrics_bind: str | None = Field(
        None,
        pattern=r"^[0-9.]+:[0-9]+$",
        description="Loopback or private IPv4 address and port ('127.0.0.1:9466') of a "
        "separate plain HTTP listener that serves only GET /metrics. The gateway's port then "
        "serves no metrics. With --metrics-api-key as well, this listener requires the key too.",
    )

    @model_validator(mode="after")
    def _check_metrics_options(self) -> Self:
        if self.metrics_api_key is not None:
            length = len(self.metrics_api_key.get_secret_value())
            if length < MIN_METRICS_KEY_LENGTH:
                raise ValueError(
                    f"--metrics-api-key has {length} characters; use a random secret of at "
                    f"least {MIN_METRICS_KEY_LENGTH}"
                )
        if self.metrics_bind is None:
            return self
        address, port = self.metrics_address_port
        if not (address.is_loopback or address.is_private) or address.is_unspecified:
            raise ValueError(
                f"--metrics-bind={self.metrics_bind!r} is not an internal address; use a "
                "loopback or private IPv4 address such as 127.0.0.1:9466"
            )
        if not 1 <= port <= 65535:
            raise ValueError(f"--metrics-bind={self.metrics_bind!r} has no valid port (1-65535)")
        if port in (self.listen_port, self.http_redirect_port):
            raise ValueError(
                f"--metrics-bind={self.metrics_bind!r} uses the port of another gateway "
                "listener; choose a port of its own"
            )
        return self

    @property
    def metrics_address_port(self) -> tuple[IPv4Address, int]:
        """The address and port of --metrics-bind; ValueError when it is unset or invalid."""
        if self.metrics_bind is None:
            raise ValueError("--metrics-bind is not set")
        host, _, port = self.metrics_bind.rpartition(":")
        try:
            return IPv4Address(host), int(port)
        except ValueError as exc:
            raise ValueError(
                f"--metrics-bind={self.metrics_bind!r} is not '<IPv4 address>:<port>'"
            ) from exc

    @model_validator(mode="after")
    def _check_tls_options(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            present, missing = (
                ("--tls-cert", "--tls-key") if self.tls_key is None else ("--tls-key", "--tls-cert")
            )
            raise ValueError(f"{present} is set but {missing} is not; give both or neither")
        if self.http_redirect_port is None:
            return self
        if self.tls_cert is None:
            raise ValueError(
                "--http-redirect-port redirects to HTTPS, which needs --tls-cert and --tls-key"
            )
        if self.public_host is None:
            raise ValueError(
                "--http-redirect-port needs --public-host, the name clients use in https:// "
                "URLs; redirects never copy the request's Host header"
            )
        if self.http_redirect_port == self.listen_port:
            raise ValueError(
                f"--http-redirect-port={self.http_redirect_port} equals --listen-port; choose "
                "another port for the redirect listener"
            )
        return self

    @property
    def serves_tls(self) -> bool:
        """Whether the gateway serves HTTPS, which it does whenever a certificate is given."""
        return self.tls_cert is not None

    def check_transport(self) -> None:
        """Raise ConfigurationError when the gateway would serve plain HTTP without --insecure-http.

        The production profile therefore never serves plain HTTP unasked. This runs when the
        gateway starts rather than as a validator, so that tools and tests can load the settings
        of a production gateway without certificate files.
        """
        if self.serves_tls or self.insecure_http:
            return
        raise ConfigurationError(
            "no TLS certificate configured: pass --tls-cert and --tls-key, or pass "
            "--insecure-http to serve plain HTTP on loopback behind a reverse proxy that "
            "terminates TLS"
        )
