#!/usr/bin/env bash
# Install and start what Agent Runner needs on one Debian 12 host: the Debian packages, the
# Python venv, a Docker engine, and a private NATS server (JetStream) and Redis server on
# loopback with generated passwords.
#
# Run as root from anywhere, as often as you like: each step does only what is missing.
# NATS and Redis listen on 127.0.0.1 ports 14222 and 16379, which DEPS_NATS_PORT and
# DEPS_REDIS_PORT override. They use their own configuration, data and pid files under var/,
# so a system NATS or Redis on the default ports is never touched.
# scripts/stop-deps.sh stops what this script started. Source var/agent-runner.env to get
# the connection settings.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/pidfile.sh
. "$ROOT/scripts/pidfile.sh"
VAR="$ROOT/var"
RUN_DIR="$VAR/run"
LOG_DIR="$VAR/log"
SECRETS_DIR="$VAR/secrets"

NATS_PORT=${DEPS_NATS_PORT:-14222}
NATS_USER=agent-runner
REDIS_PORT=${DEPS_REDIS_PORT:-16379}

# Seconds to wait for a daemon to respond after it was started.
DOCKERD_START_TIMEOUT=60
NATS_START_TIMEOUT=20
REDIS_START_TIMEOUT=20

APT_PACKAGES=(
    docker.io
    nats-server
    redis-server
    nftables
    python3-nftables
    python3-venv
    busybox-static
    curl
    runsc
    # The tests compile small static probes (seccomp, setuid, ICMP) into agent images.
    gcc
    libc6-dev
    iproute2
    procps
)

log() {
    echo "deps: $*" >&2
}

die() {
    echo "deps: error: $*" >&2
    exit 1
}

# Print the last lines of a log file to stderr, to explain a failure.
show_log_tail() {
    local file=$1
    if [[ -f "$file" ]]; then
        echo "deps: last lines of $file:" >&2
        tail -n 20 "$file" >&2
    fi
}

# Start a program in its own session, detached from this script, and record its pid.
# setsid does not fork here because a background job of a non-interactive shell is not a
# process group leader, so $! is the daemon's own pid.
start_detached() {
    local pid_file=$1 log_file=$2
    shift 2
    setsid "$@" </dev/null >>"$log_file" 2>&1 &
    record_pid "$pid_file" "$!"
}

# Succeed when something accepts TCP connections on 127.0.0.1:PORT.
port_is_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Read a secret from var/secrets, creating it with 32 random bytes in hex on first use.
# Hex needs no quoting in the NATS and Redis configuration files.
read_or_create_secret() {
    local file="$SECRETS_DIR/$1"
    if [[ ! -s "$file" ]]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$file.tmp")
        mv "$file.tmp" "$file"
    fi
    chmod 600 "$file"
    cat "$file"
}

# Write stdin to a file with mode 600, replacing it atomically.
write_private_file() {
    local file=$1
    (umask 077 && cat >"$file.tmp")
    mv "$file.tmp" "$file"
}

install_packages() {
    local missing=() package status
    for package in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
        if [[ "$status" != installed ]]; then
            missing+=("$package")
        fi
    done
    if ((${#missing[@]} == 0)); then
        return
    fi

    log "installing ${missing[*]} (log: $LOG_DIR/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    # needrestart's apt hook may restart daemons that this script did not start.
    export NEEDRESTART_SUSPEND=1
    if ! apt-get update -q >>"$LOG_DIR/apt.log" 2>&1; then
        show_log_tail "$LOG_DIR/apt.log"
        die "apt-get update failed"
    fi
    if ! apt-get install -y -q "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1; then
        show_log_tail "$LOG_DIR/apt.log"
        die "apt-get install failed for: ${missing[*]}"
    fi
}

# Docker's default seccomp profile, the one the daemon applies when a container names none.
# Agents get the stricter profile in services/supervisor/profiles/seccomp.json; this copy is
# the reference that tests/unit/supervisor/test_seccomp.py compares it with. It ships only
# inside Debian's golang-github-docker-docker-dev, whose dependencies take about 1 GB, so
# only that one file is taken from the package archive; the package matches the docker.io
# version of the same Debian release.
SECCOMP_PROFILE=/usr/local/share/agent-runner/docker-default-seccomp.json
SECCOMP_SOURCE=./usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json
install_seccomp_profile() {
    if [[ -s "$SECCOMP_PROFILE" ]]; then
        return
    fi
    local workdir
    workdir=$(mktemp -d)
    log "extracting Docker's default seccomp profile to $SECCOMP_PROFILE"
    if ! (cd "$workdir" && apt-get download -q golang-github-docker-docker-dev \
        >>"$LOG_DIR/apt.log" 2>&1); then
        apt-get update -q >>"$LOG_DIR/apt.log" 2>&1 || true
        (cd "$workdir" && apt-get download -q golang-github-docker-docker-dev \
            >>"$LOG_DIR/apt.log" 2>&1) || {
            rm -rf "$workdir"
            die "cannot download golang-github-docker-docker-dev (see $LOG_DIR/apt.log)"
        }
    fi
    mkdir -p "$(dirname "$SECCOMP_PROFILE")"
    dpkg-deb --fsys-tarfile "$workdir"/golang-github-docker-docker-dev_*.deb |
        tar -xO "$SECCOMP_SOURCE" >"$SECCOMP_PROFILE.tmp"
    rm -rf "$workdir"
    if ! python3 -c 'import json, sys; json.load(open(sys.argv[1]))["defaultAction"]' \
        "$SECCOMP_PROFILE.tmp"; then
        rm -f "$SECCOMP_PROFILE.tmp"
        die "the extracted seccomp profile is not valid JSON"
    fi
    mv "$SECCOMP_PROFILE.tmp" "$SECCOMP_PROFILE"
}

# The AppArmor profile of agents. Loading policy needs CAP_MAC_ADMIN, which the supervisor
# should not need, so this script loads it and the supervisor only checks that it is loaded:
# with AppArmor enabled and the profile missing, the supervisor refuses to start. The kernel
# drops the profile at reboot, so run this script again after one. -r replaces a loaded
# version and -W caches the compiled policy.
APPARMOR_PROFILE="$ROOT/services/supervisor/profiles/apparmor-agent"
apparmor_enabled() {
    [[ -d /sys/kernel/security/apparmor ]] &&
        [[ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" == Y ]]
}
load_apparmor_profile() {
    if ! apparmor_enabled; then
        log "the kernel does not enforce AppArmor; agents run without an AppArmor profile"
        return
    fi
    if ! command -v apparmor_parser >/dev/null; then
        if ! apt-get install -y -q apparmor >>"$LOG_DIR/apt.log" 2>&1; then
            show_log_tail "$LOG_DIR/apt.log"
            die "apt-get install failed for: apparmor"
        fi
    fi
    log "loading the AppArmor profile of agents from $APPARMOR_PROFILE"
    if ! apparmor_parser -r -W "$APPARMOR_PROFILE" >>"$LOG_DIR/apparmor.log" 2>&1; then
        show_log_tail "$LOG_DIR/apparmor.log"
        die "apparmor_parser failed to load $APPARMOR_PROFILE"
    fi
}

# Create .venv and install the project into it in editable mode. pip runs again only when
# pyproject.toml is newer than the stamp file that the last successful install left.
install_venv() {
    local venv="$ROOT/.venv"
    local stamp="$venv/.agent-runner-installed"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating $venv"
        # python3-nftables is a Debian package, so the venv needs the system site packages.
        /usr/bin/python3 -m venv --system-site-packages "$venv"
    fi
    if [[ -f "$stamp" && ! "$ROOT/pyproject.toml" -nt "$stamp" ]]; then
        return
    fi

    log "installing the project into $venv (log: $LOG_DIR/pip.log)"
    if ! (cd "$ROOT" && "$venv/bin/pip" install -q -e '.[dev]') >>"$LOG_DIR/pip.log" 2>&1; then
        show_log_tail "$LOG_DIR/pip.log"
        die "pip install -e '.[dev]' failed"
    fi
    touch "$stamp"
}

docker_responds() {
    timeout 10 docker info >/dev/null 2>&1
}

# gVisor: Debian's runsc fails on kernels from about 6.10, so Docker gets it through the
# wrapper runtime in runtime/runsc_agent_runner.py (see docs/runtime.md), registered in
# daemon.json under this name. The supervisor's --runtime=runsc uses that name.
RUNSC_WRAPPER=/usr/local/lib/agent-runner/runsc-agent-runner
RUNSC_RUNTIME_NAME=runsc
DOCKER_DAEMON_JSON=/etc/docker/daemon.json
RUNTIME_RELOAD_TIMEOUT=15

install_runsc_wrapper() {
    if ! cmp -s "$ROOT/runtime/runsc_agent_runner.py" "$RUNSC_WRAPPER"; then
        log "installing the gVisor wrapper runtime to $RUNSC_WRAPPER"
        install -D -m 755 "$ROOT/runtime/runsc_agent_runner.py" "$RUNSC_WRAPPER.tmp"
        mv "$RUNSC_WRAPPER.tmp" "$RUNSC_WRAPPER"
    fi
}

# Add the wrapper to daemon.json's "runtimes", keeping every other key. A runtime of that
# name with another path is left alone, because the operator may have registered an upstream
# runsc on purpose. The supervisor's startup probe tests whichever is registered.
register_runsc_runtime() {
    # daemon.json belongs to the operator of a dockerd that this script did not start, so it
    # is left unchanged and the log names the entry to add.
    if pgrep -x dockerd >/dev/null && ! owned_pid "$RUN_DIR/dockerd.pid" /usr/sbin/dockerd >/dev/null; then
        if ! docker_has_runtime "$RUNSC_RUNTIME_NAME"; then
            log "warning: the running dockerd was not started by this script and has no runtime" \
                "'$RUNSC_RUNTIME_NAME'; add \"runtimes\": {\"$RUNSC_RUNTIME_NAME\": {\"path\":" \
                "\"$RUNSC_WRAPPER\"}} to $DOCKER_DAEMON_JSON and reload it (kill -HUP its pid)." \
                "Until then --runtime=runsc fails the supervisor's startup probe."
        fi
        return
    fi
    python3 - "$DOCKER_DAEMON_JSON" "$RUNSC_RUNTIME_NAME" "$RUNSC_WRAPPER" <<'PYTHON'
import json
import os
import sys

path, name, wrapper = sys.argv[1:]
try:
    with open(path) as file:
        config = json.load(file)
except FileNotFoundError:
    config = {}
except ValueError as exc:
    sys.exit(f"deps: error: {path} is not valid JSON ({exc}); fix it, then run again")
if not isinstance(config, dict) or not isinstance(config.get("runtimes", {}), dict):
    sys.exit(f"deps: error: {path} must be a JSON object whose 'runtimes' is an object")
runtimes = config.setdefault("runtimes", {})
current = runtimes.get(name)
if current is not None and current != {"path": wrapper}:
    print(f"deps: keeping runtime {name!r} = {current} in {path}", file=sys.stderr)
    sys.exit(0)
if current is None:
    runtimes[name] = {"path": wrapper}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as file:
        json.dump(config, file, indent=2)
        file.write("\n")
    os.replace(path + ".tmp", path)
    print(f"deps: registered runtime {name!r} in {path}", file=sys.stderr)
PYTHON
}

docker_has_runtime() {
    timeout 10 docker info --format '{{json .Runtimes}}' 2>/dev/null |
        python3 -c 'import json, sys; sys.exit(sys.argv[1] not in json.load(sys.stdin))' "$1"
}

# Make the running daemon load the runtime. Runtimes are reloadable, so our own dockerd gets
# SIGHUP and keeps its containers running; a dockerd that this script did not start is never
# signalled.
reload_docker_runtimes() {
    local pid deadline
    if docker_has_runtime "$RUNSC_RUNTIME_NAME"; then
        return
    fi
    if ! pid=$(owned_pid "$RUN_DIR/dockerd.pid" /usr/sbin/dockerd); then
        return  # register_runsc_runtime logged the entry to add
    fi
    log "reloading dockerd (pid $pid) to register runtime '$RUNSC_RUNTIME_NAME'"
    kill -HUP "$pid"
    deadline=$((SECONDS + RUNTIME_RELOAD_TIMEOUT))
    until docker_has_runtime "$RUNSC_RUNTIME_NAME"; do
        if ((SECONDS >= deadline)); then
            show_log_tail "$LOG_DIR/dockerd.log"
            die "dockerd (pid $pid) did not list runtime '$RUNSC_RUNTIME_NAME' within ${RUNTIME_RELOAD_TIMEOUT}s of SIGHUP (timed out)"
        fi
        sleep 0.5
    done
}

# Start dockerd unless a Docker engine already responds. A second dockerd on the same host
# would flush the first one's iptables chains, so this never starts one while another
# dockerd process exists, even one that does not respond yet.
start_dockerd() {
    local pid_file="$RUN_DIR/dockerd.pid" log_file="$LOG_DIR/dockerd.log" pid deadline
    if docker_responds; then
        return
    fi

    if owned_pid "$pid_file" /usr/sbin/dockerd >/dev/null; then
        log "waiting for our dockerd (pid $(<"$pid_file")) to respond"
    elif pgrep -x dockerd >/dev/null; then
        die "a dockerd that this script did not start is running but 'docker info' fails; fix or stop it first"
    else
        log "starting dockerd (log: $log_file)"
        start_detached "$pid_file" "$log_file" /usr/sbin/dockerd
    fi

    pid=$(<"$pid_file")
    deadline=$((SECONDS + DOCKERD_START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if docker_responds; then
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            remove_pid_file "$pid_file"
            show_log_tail "$log_file"
            die "dockerd (pid $pid) exited during startup"
        fi
        sleep 1
    done
    show_log_tail "$log_file"
    die "dockerd (pid $pid) did not respond to 'docker info' within ${DOCKERD_START_TIMEOUT}s (timed out)"
}

# Succeed when the server on the NATS port sends an INFO line that reports JetStream.
nats_responds() {
    local info
    info=$(timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT && head -n 1 <&3" 2>/dev/null) || return 1
    [[ "$info" == INFO* && "$info" == *'"jetstream":true'* ]]
}

redis_responds() {
    [[ "$(REDISCLI_AUTH="$REDIS_PASSWORD" timeout 2 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" \
        --no-auth-warning ping 2>/dev/null)" == PONG ]]
}

# Wait until CHECK succeeds, failing when the daemon exits or the timeout in seconds passes.
wait_until_ready() {
    local name=$1 pid_file=$2 log_file=$3 timeout_s=$4 check=$5 pid deadline
    pid=$(<"$pid_file")
    deadline=$((SECONDS + timeout_s))
    while ((SECONDS < deadline)); do
        if "$check"; then
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            remove_pid_file "$pid_file"
            show_log_tail "$log_file"
            die "$name (pid $pid) exited during startup"
        fi
        sleep 0.5
    done
    show_log_tail "$log_file"
    die "$name (pid $pid) did not respond on 127.0.0.1 within ${timeout_s}s (timed out)"
}

start_nats() {
    local pid_file="$RUN_DIR/nats.pid" log_file="$LOG_DIR/nats.log" conf="$SECRETS_DIR/nats.conf"
    local password
    password=$(read_or_create_secret nats.password)
    NATS_PASSWORD=$password
    mkdir -p "$VAR/nats"
    chmod 700 "$VAR/nats"
    write_private_file "$conf" <<EOF
# Generated by scripts/deps.sh; changes are overwritten on its next run.
listen: "127.0.0.1:$NATS_PORT"
authorization {
    users: [
        { user: "$NATS_USER", password: "$password" }
    ]
}
jetstream {
    store_dir: "$VAR/nats"
}
EOF

    if owned_pid "$pid_file" /usr/sbin/nats-server >/dev/null; then
        wait_until_ready nats-server "$pid_file" "$log_file" "$NATS_START_TIMEOUT" nats_responds
        return
    fi
    remove_pid_file "$pid_file"
    if port_is_open "$NATS_PORT"; then
        die "127.0.0.1:$NATS_PORT is in use by a process that this script did not start; stop it first"
    fi

    log "starting nats-server on 127.0.0.1:$NATS_PORT (log: $log_file)"
    start_detached "$pid_file" "$log_file" /usr/sbin/nats-server -c "$conf"
    wait_until_ready nats-server "$pid_file" "$log_file" "$NATS_START_TIMEOUT" nats_responds
}

start_redis() {
    local pid_file="$RUN_DIR/redis.pid" log_file="$LOG_DIR/redis.log" conf="$SECRETS_DIR/redis.conf"
    local password
    password=$(read_or_create_secret redis.password)
    REDIS_PASSWORD=$password
    mkdir -p "$VAR/redis"
    chmod 700 "$VAR/redis"
    write_private_file "$conf" <<EOF
# Generated by scripts/deps.sh; changes are overwritten on its next run.
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
requirepass $password
daemonize no
dir "$VAR/redis"
logfile ""
EOF

    if owned_pid "$pid_file" /usr/bin/redis-server >/dev/null; then
        wait_until_ready redis-server "$pid_file" "$log_file" "$REDIS_START_TIMEOUT" redis_responds
        return
    fi
    remove_pid_file "$pid_file"
    if port_is_open "$REDIS_PORT"; then
        die "127.0.0.1:$REDIS_PORT is in use by a process that this script did not start; stop it first"
    fi

    log "starting redis-server on 127.0.0.1:$REDIS_PORT (log: $log_file)"
    start_detached "$pid_file" "$log_file" /usr/bin/redis-server "$conf"
    wait_until_ready redis-server "$pid_file" "$log_file" "$REDIS_START_TIMEOUT" redis_responds
}

write_env_file() {
    write_private_file "$VAR/agent-runner.env" <<EOF
# Generated by scripts/deps.sh. Contains passwords: keep it private.
export AGENT_RUNNER_NATS_URL=nats://127.0.0.1:$NATS_PORT
export AGENT_RUNNER_NATS_USER=$NATS_USER
export AGENT_RUNNER_NATS_PASSWORD=$NATS_PASSWORD
export AGENT_RUNNER_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
export AGENT_RUNNER_REDIS_PASSWORD=$REDIS_PASSWORD
EOF
}

main() {
    if ((EUID != 0)); then
        die "run as root: it installs packages and starts dockerd"
    fi
    local port
    for port in "$NATS_PORT" "$REDIS_PORT"; do
        if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
            die "invalid port ${port@Q} in DEPS_NATS_PORT or DEPS_REDIS_PORT; expected 1-65535"
        fi
    done
    # The venv must stay readable for services that run under their own user ids, so only
    # the files under var/secrets and the env file get mode 600.
    umask 022
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$SECRETS_DIR"
    chmod 700 "$SECRETS_DIR"

    install_packages
    install_seccomp_profile
    load_apparmor_profile
    install_venv
    install_runsc_wrapper
    register_runsc_runtime
    start_dockerd
    reload_docker_runtimes
    start_nats
    start_redis
    write_env_file
    log "ready; connection settings are in $VAR/agent-runner.env"
}

main "$@"
