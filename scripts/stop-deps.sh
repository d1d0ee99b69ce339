#!/usr/bin/env bash
# Stop the daemons that scripts/deps.sh started, newest first: redis-server, nats-server,
# then dockerd. Pass names (redis nats dockerd) to stop only those.
#
# Only a process named by one of deps.sh's pid files under var/run is stopped, and only while
# it runs the expected binary with the start time that deps.sh recorded (see pidfile.sh), so a
# reused pid is never signalled. A Docker engine, NATS or Redis started any other way is left
# running.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/pidfile.sh
. "$ROOT/scripts/pidfile.sh"
RUN_DIR="$ROOT/var/run"

declare -A BINARIES=(
    [redis]=/usr/bin/redis-server
    [nats]=/usr/sbin/nats-server
    [dockerd]=/usr/sbin/dockerd
)
# Seconds to wait after SIGTERM. dockerd first stops its containers, which takes up to
# 15 s each with its default shutdown timeout.
declare -A STOP_TIMEOUTS=(
    [redis]=30
    [nats]=30
    [dockerd]=90
)
DEFAULT_ORDER=(redis nats dockerd)

log() {
    echo "stop-deps: $*" >&2
}

# Wait until the process is gone, for at most the given number of seconds.
wait_for_exit() {
    local pid=$1 timeout_s=$2 i
    for ((i = 0; i < timeout_s * 2; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    return 1
}

stop_one() {
    local name=$1 pid_file="$RUN_DIR/$1.pid" pid
    if [[ ! -f "$pid_file" ]]; then
        return 0
    fi
    if ! pid=$(owned_pid "$pid_file" "${BINARIES[$name]}"); then
        log "$name is not running under the recorded pid and start time; removing the stale $pid_file"
        remove_pid_file "$pid_file"
        return 0
    fi

    log "stopping $name (pid $pid)"
    kill -TERM "$pid"
    if ! wait_for_exit "$pid" "${STOP_TIMEOUTS[$name]}"; then
        log "$name (pid $pid) did not exit within ${STOP_TIMEOUTS[$name]}s of SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        if ! wait_for_exit "$pid" 5; then
            log "error: $name (pid $pid) is still running after SIGKILL"
            return 1
        fi
    fi
    remove_pid_file "$pid_file"
}

main() {
    local names=("$@") name failed=0
    if ((${#names[@]} == 0)); then
        names=("${DEFAULT_ORDER[@]}")
    fi
    for name in "${names[@]}"; do
        if [[ -z "${BINARIES[$name]+set}" ]]; then
            log "error: unknown name ${name@Q}; expected one of: ${DEFAULT_ORDER[*]}"
            exit 2
        fi
    done

    for name in "${names[@]}"; do
        stop_one "$name" || failed=1
    done
    exit "$failed"
}

main "$@"
