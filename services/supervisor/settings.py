"""Supervisor settings: container limits, lifetimes, image download and cache, Docker."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import ByteSize, Field, model_validator

from libs.common.settings import CommonSettings
from services.supervisor.download import DEFAULT_MAX_REDIRECTS
from services.supervisor.image_sources import parse_trusted_sources

MIB = 1024 * 1024
GIB = 1024 * MIB


class SupervisorSettings(CommonSettings):
    """Everything the supervisor needs to download images and run hardened containers."""

    development_defaults: ClassVar[dict[str, Any]] = {
        "allow_http_image_urls": True,
        "require_signed_images": False,
        "runtime": "runc",
        "require_gvisor": False,
    }

    container_memory_limit: ByteSize = Field(
        ByteSize(512 * MIB),
        description="Memory limit of each agent container, swap included (bytes; suffixes "
        "such as 512MiB or 1GiB accepted). The container is killed when it goes over.",
    )
    container_cpu_limit: float = Field(
        1.0, gt=0, le=64, description="CPU limit of each agent container, in CPUs."
    )
    container_pids_limit: int = Field(
        100,
        ge=8,
        le=32768,
        description="Maximum processes and threads in each agent container; stops fork bombs.",
    )
    container_disk_limit: ByteSize = Field(
        ByteSize(64 * MIB),
        ge=MIB,
        description="Size of the agent's /tmp tmpfs (bytes; suffixes accepted). The root "
        "filesystem is read-only, so /tmp and /dev/shm are the only writable storage, and both "
        "count towards the memory limit.",
    )
    container_shm_limit: ByteSize = Field(
        ByteSize(16 * MIB),
        ge=MIB,
        description="Size of the agent's /dev/shm tmpfs, used for POSIX shared memory and "
        "semaphores (bytes; suffixes accepted). It counts towards the memory limit.",
    )
    container_nofile_limit: int = Field(
        1024, ge=64, le=1_048_576, description="Open-file limit (RLIMIT_NOFILE) of each agent."
    )
    container_log_max_size: ByteSize = Field(
        ByteSize(10 * MIB),
        description="Size at which Docker rotates an agent's log file; two files are kept, so "
        "an agent cannot fill the host disk with output (bytes; suffixes accepted).",
    )
    max_container_lifetime: int = Field(
        3600,
        gt=0,
        le=7 * 24 * 3600,
        description="Seconds an agent may run before it is stopped. A request may ask for a "
        "shorter lifetime, never a longer one.",
    )
    agent_start_timeout: float = Field(
        30.0, gt=0, le=600, description="Seconds an agent has to respond to HTTP on port 80."
    )
    agent_stop_grace: int = Field(
        5, ge=0, le=60, description="Seconds between SIGTERM and SIGKILL when stopping."
    )
    max_agents: int = Field(
        50, gt=0, le=10_000, description="Maximum agents running on this host at once."
    )
    max_concurrent_starts: int = Field(
        4, gt=0, le=64, description="Maximum image downloads and starts in progress at once."
    )
    bind_address: IPv4Address = Field(
        IPv4Address("127.0.0.1"),
        description="Host address on which agent ports are published. Keep it on loopback: "
        "any other address exposes every agent to that network.",
    )
    # Runtime selection and the gVisor startup probe (services/supervisor/runtime_probe.py).
    runtime: str = Field(
        "runsc",
        pattern=r"^(runc|runsc)$",
        description="OCI runtime of agent containers: 'runsc' for gVisor, whose user-space "
        "kernel stands between an agent and the host's kernel, or 'runc'. Development "
        "profile: runc, where a kernel exploit in an agent reaches the host's kernel.",
    )
    require_gvisor: bool = Field(
        True,
        description="Refuse to start unless --runtime is runsc and a probe container really "
        "ran under gVisor at startup. Development profile: false, and a failed probe is only "
        "reported (metrics, audit runtime.probed, log).",
    )
    runsc_docker_runtime: str = Field(
        "runsc",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="Name under which the gVisor runtime is registered with the Docker daemon "
        "(daemon.json 'runtimes'); agents use it when --runtime is runsc. scripts/deps.sh "
        "registers its wrapper as 'runsc'.",
    )
    runtime_probe_binary: Path = Field(
        Path("/bin/busybox"),
        description="Statically linked busybox that the gVisor probe imports as a one-file "
        "image and runs under --runtime at startup; Debian's busybox-static installs it.",
    )
    runtime_probe_timeout: float = Field(
        60.0, gt=0, le=600, description="Seconds the gVisor probe container may take to run."
    )
    runsc_sandbox_pids_limit: int = Field(
        4096,
        ge=256,
        le=65536,
        description="Host pids limit of each agent's gVisor sandbox under --runtime=runsc. "
        "gVisor's own threads count there (runsc 0.0~20221219 on ptrace: about 67 at start "
        "and about 10 more per guest process, kept after it exits), and a sandbox that "
        "reaches the limit crashes. Under runsc, --container-pids-limit becomes the agent's "
        "RLIMIT_NPROC, which gVisor enforces inside each sandbox.",
    )

    @property
    def host_pids_limit(self) -> int:
        """pids cgroup limit of an agent: its own under runc, its gVisor sandbox's under runsc."""
        if self.runtime == "runsc":
            return self.runsc_sandbox_pids_limit
        return self.container_pids_limit

    @property
    def docker_runtime(self) -> str:
        """Name of the Docker runtime that runs agents: runc, or the registered runsc."""
        return self.runsc_docker_runtime if self.runtime == "runsc" else self.runtime

    @model_validator(mode="after")
    def _check_gvisor_runtime(self) -> Self:
        if self.require_gvisor and self.runtime != "runsc":
            raise ValueError(
                f"--require-gvisor is on but --runtime is {self.runtime!r}; set --runtime=runsc, "
                "or --no-require-gvisor to run agents without gVisor"
            )
        return self

    sandbox_network: str = Field(
        "agent-runner-sandbox",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="Name of the Docker bridge network that agents join.",
    )
    sandbox_subnet: IPv4Network = Field(
        IPv4Network("172.30.0.0/16"),
        description="Subnet of the sandbox network; must not overlap any network of the host.",
    )
    sandbox_bridge: str = Field(
        "ar-sandbox0",
        pattern=r"^[A-Za-z0-9_.-]{1,15}$",
        description="Linux bridge interface name of the sandbox network.",
    )
    seccomp_profile: Path | None = Field(
        None,
        description="Seccomp profile (JSON) applied to every agent. Unset: the profile shipped "
        "in services/supervisor/profiles/seccomp.json, Docker's default without the syscall "
        "families that agents never need. Another profile must deny those families too.",
    )
    unsafe_allow_seccomp_families: bool = Field(
        False,
        description="Accept a --seccomp-profile that allows syscalls the shipped profile denies "
        "(mount, kernel modules, keyrings, bpf, perf, ptrace, userfaultfd, io_uring, kexec, "
        "namespaces, clock setting). Each one is logged as a warning at every start; agents "
        "then reach more of the host kernel.",
    )
    apparmor_profile: str = Field(
        "agent-runner-agent",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="AppArmor profile applied to every agent when the kernel supports "
        "AppArmor; scripts/deps.sh loads the shipped one under this name. The supervisor "
        "refuses to start when AppArmor is enabled but the profile is not loaded.",
    )
    allow_http_image_urls: bool = Field(
        False,
        description="Accept plain http:// image URLs. Development profile: true. Without TLS "
        "anyone on the path can swap the tarball; the digest check still holds.",
    )
    image_max_size: ByteSize = Field(
        ByteSize(2048 * MIB),
        description="Largest image tarball accepted for download (bytes; suffixes accepted).",
    )
    image_max_members: int = Field(
        10_000, gt=0, description="Maximum number of members in an image tarball."
    )
    download_connect_timeout: float = Field(
        10.0, gt=0, le=300, description="Seconds to connect to an image URL."
    )
    download_read_timeout: float = Field(
        30.0, gt=0, le=600, description="Seconds to wait for more bytes of an image."
    )
    download_total_timeout: float = Field(
        600.0, gt=0, le=7200, description="Seconds a whole image download may take."
    )
    cache_dir: Path = Field(
        Path("/var/lib/agent-runner/cache"),
        description="Folder of the content-addressed cache of verified image tarballs.",
    )
    monitor_interval: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Seconds between checks of agent lifetimes, exits and resource use. A "
        "pids, disk or memory limit hit is acted on at the next check.",
    )
    # Resource monitoring (services/supervisor/monitor.py, services/supervisor/cgroups.py).
    limit_warning_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Fraction of a memory, CPU, pids or disk limit at which an agent gets an "
        "agent.limit_warning audit event; it is emitted again only after use drops below.",
    )
    lifetime_warning_seconds: float = Field(
        60.0,
        ge=0,
        le=24 * 3600,
        description="Seconds before an agent's lifetime ends at which an "
        "agent.lifetime_warning audit event is emitted; 0 turns the warning off.",
    )
    cgroup_root: Path = Field(
        Path("/sys/fs/cgroup"),
        description="Mount point of the cgroup v1 hierarchies that agent resource use is "
        "read from.",
    )
    cgroup_parent: str = Field(
        "docker",
        pattern=r"^[A-Za-z0-9_.-]{1,255}$",
        description="cgroup under which dockerd creates container cgroups (its "
        "--cgroup-parent; 'docker' with the cgroupfs driver).",
    )
    runsc_binary: Path = Field(
        Path("/usr/bin/runsc"),
        description="gVisor's runsc, which the monitor runs as `runsc events --stats` under "
        "--runtime=runsc to count each agent's processes inside its sandbox.",
    )
    runsc_state_root: Path = Field(
        Path("/var/run/docker/runtime-runc/moby"),
        description="runsc's --root, where Docker's containerd shim keeps the sandboxes' "
        "state (Docker 20.10 uses runc's folder for every runc-compatible runtime).",
    )
    firewall_registration_timeout: float = Field(
        10.0, gt=0, le=120, description="Seconds to wait for netguard to register an agent."
    )
    log_max_line_length: int = Field(
        8192,
        ge=80,
        le=1_048_576,
        description="Characters kept of one agent log line; longer lines are cut, marked "
        "' [truncated]' and counted. At most four bytes per character are read of a line.",
    )
    # Log collection (services/supervisor/agent_logs.py).
    log_rate_limit: float = Field(
        100.0,
        gt=0,
        le=100_000,
        description="Lines per second that each agent may add to its stored log on average; "
        "lines above the limit are dropped, counted and audited (agent.logs_dropped), so a "
        "flooding agent cannot fill Redis or push other output out.",
    )
    log_rate_burst: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Lines an agent may write at once above --log-rate-limit before lines "
        "are dropped.",
    )
    log_keep_lines: int = Field(
        1000,
        ge=10,
        le=100_000,
        description="Lines of each agent's output kept in Redis, live and for "
        "--final-record-ttl seconds after it stops; older lines are removed. Each line takes "
        "up to 4 x --log-max-line-length bytes, so this bounds Redis memory per agent.",
    )
    final_record_ttl: int = Field(
        7 * 24 * 3600, gt=0, description="Seconds to keep records of stopped agents."
    )

    # Trusted image sources (services/supervisor/image_sources.py, download.py).
    trusted_image_sources: list[str] = Field(
        default_factory=list,
        description="URL prefixes (scheme, host, optional port, path) that images may be "
        "downloaded from, such as https://images.example.com/agents/; repeat the flag or "
        "separate entries with commas. A URL and every redirect target must have a source's "
        "scheme, host and port and a path under its path at a '/' boundary. Empty, the "
        "default, allows any host; production deployments should set it. Hosts that resolve "
        "to loopback, private, link-local or other internal addresses are refused either way, "
        "unless a source names the address itself (http://127.0.0.1:8080/). http:// sources "
        "need --allow-http-image-urls.",
    )
    image_max_redirects: int = Field(
        DEFAULT_MAX_REDIRECTS,
        ge=0,
        le=20,
        description="Redirects followed per image download, each target checked like the URL "
        "itself; 0 refuses every redirect.",
    )

    @model_validator(mode="after")
    def _check_trusted_image_sources(self) -> Self:
        # Stored in canonical form, which the startup log and the download checks both use.
        sources = parse_trusted_sources(
            self.trusted_image_sources, allow_http=self.allow_http_image_urls
        )
        self.trusted_image_sources = [source.url for source in sources]
        return self

    # Image signatures (services/supervisor/signatures.py).
    require_signed_images: bool = Field(
        True,
        description="Run only images whose tarball carries a valid signature by a configured "
        "key or Sigstore identity. Development profile: false, and each unsigned image is "
        "logged as a warning and audited (image.unsigned).",
    )
    image_signing_key: list[Path] = Field(
        default_factory=list,
        description="PEM public key (ECDSA P-256 or Ed25519) whose cosign sign-blob "
        "signatures are accepted; repeat for several keys.",
    )
    image_signing_trusted_root: Path | None = Field(
        None,
        description="Sigstore trusted_root.json for verifying certificate bundles offline; "
        "needs --image-signing-identity and --image-signing-issuer.",
    )
    image_signing_identity: str | None = Field(
        None,
        description="Exact signer identity (certificate e-mail or URI) that Sigstore bundles "
        "must carry.",
    )
    image_signing_issuer: str | None = Field(
        None, description="Exact OIDC issuer that Sigstore bundles must carry."
    )

    # Image cache limits and eviction, and the metrics endpoint that reports them
    # (services/supervisor/cache_manager.py, services/supervisor/metrics.py).
    cache_max_size: ByteSize = Field(
        ByteSize(10 * GIB),
        ge=0,
        description="Total size of cached image tarballs above which the least recently used "
        "images are evicted (bytes; suffixes accepted). Images that agents use are never "
        "evicted, so the cache can stay above this size while they run, and a download in "
        "progress adds up to --image-max-size on top.",
    )
    cache_max_age: int = Field(
        7 * 24 * 3600,
        gt=0,
        le=365 * 24 * 3600,
        description="Seconds since its last use after which a cached image is evicted, "
        "whatever the cache size.",
    )
    cache_eviction_interval: float = Field(
        300.0,
        gt=0,
        le=24 * 3600,
        description="Seconds between eviction runs; one also runs right after each download.",
    )
    metrics_address: IPv4Address = Field(
        IPv4Address("127.0.0.1"),
        description="Address of the supervisor's Prometheus metrics (image cache size, hits, "
        "misses, evictions). Keep it internal: the metrics show how the host is used.",
    )
    metrics_port: int = Field(
        9465, ge=0, le=65535, description="Port of the supervisor's metrics; 0 turns them off."
    )

    @model_validator(mode="after")
    def _check_subnet(self) -> Self:
        if not self.sandbox_subnet.is_private or self.sandbox_subnet.prefixlen > 28:
            raise ValueError(
                f"--sandbox-subnet {self.sandbox_subnet} must be a private IPv4 network of at "
                "least /28, such as 172.30.0.0/16"
            )
        tmpfs_total = self.container_disk_limit + self.container_shm_limit
        if tmpfs_total >= self.container_memory_limit:
            raise ValueError(
                f"--container-disk-limit ({int(self.container_disk_limit)} bytes) plus "
                f"--container-shm-limit ({int(self.container_shm_limit)} bytes) must be "
                f"smaller than --container-memory-limit ({int(self.container_memory_limit)} bytes) "
                "because both tmpfs mounts count towards it"
            )
        return self
