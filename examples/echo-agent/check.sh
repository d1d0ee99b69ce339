#!/usr/bin/env bash
# Check a tarball written by build.sh: verify its digest, load it, run it with the runner's
# hardening flags, send two requests to it on 127.0.0.1 and check the replies and the log.
# Removes the container and the image afterwards, whether the check passed or not.
#
# Usage: check.sh [OUT_DIR]    (default: the dist folder next to this script)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT_DIR=${1:-$HERE/dist}
TARBALL="$OUT_DIR/echo-agent.tar"
DIGEST_FILE="$OUT_DIR/echo-agent.digest"

# Maximum number of attempts, 0.5 s apart, to reach the agent after it started.
READY_ATTEMPTS=20

die() {
    echo "check.sh: error: $*" >&2
    exit 1
}

image_id=""
container_id=""
cleanup() {
    if [[ -n "$container_id" ]]; then
        docker rm -f "$container_id" >/dev/null 2>&1 || true
    fi
    if [[ -n "$image_id" ]]; then
        docker rmi "$image_id" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# curl to the published port only, never through a proxy from the environment.
http() {
    curl -sS --noproxy '*' --max-time 5 "$@"
}

expect_contains() {
    local what=$1 text=$2 expected=$3
    if [[ "$text" != *"$expected"* ]]; then
        printf '%s\n' "$text" >&2
        die "$what does not contain ${expected@Q}"
    fi
}

main() {
    local expected actual load_output host_port url reply logs i
    [[ -f "$TARBALL" && -f "$DIGEST_FILE" ]] || die "$TARBALL or $DIGEST_FILE not found; run build.sh first"

    expected=$(<"$DIGEST_FILE")
    actual="sha256:$(sha256sum "$TARBALL" | cut -d ' ' -f 1)"
    [[ "$actual" == "$expected" ]] || die "digest of $TARBALL is $actual, expected $expected"

    load_output=$(docker load -i "$TARBALL")
    image_id=$(sed -n 's/^Loaded image ID: //p' <<<"$load_output")
    [[ "$image_id" == sha256:* ]] || die "docker load printed ${load_output@Q}, expected 'Loaded image ID: sha256:...'"

    container_id=$(docker run -d --user 65534:65534 --read-only --cap-drop ALL \
        --security-opt no-new-privileges --sysctl net.ipv4.ip_unprivileged_port_start=0 \
        -p 127.0.0.1::80 "$image_id")
    host_port=$(docker port "$container_id" 80/tcp | sed -n 's/^127\.0\.0\.1://p' | head -n 1)
    [[ "$host_port" =~ ^[0-9]+$ ]] || die "port 80 of the container is not published on 127.0.0.1"
    url="http://127.0.0.1:$host_port"

    for ((i = 0; i < READY_ATTEMPTS; i++)); do
        if reply=$(http "$url/" 2>/dev/null); then
            break
        fi
        sleep 0.5
    done
    [[ -n "${reply:-}" ]] || die "GET $url/ got no reply after $READY_ATTEMPTS attempts"
    expect_contains "GET /" "$reply" "echo-agent is running"

    reply=$(http -X POST --data-binary 'hello from check.sh' "$url/cgi-bin/echo?x=1")
    expect_contains "POST /cgi-bin/echo" "$reply" "method: POST"
    expect_contains "POST /cgi-bin/echo" "$reply" "path: /cgi-bin/echo"
    expect_contains "POST /cgi-bin/echo" "$reply" "query: x=1"
    expect_contains "POST /cgi-bin/echo" "$reply" "hello from check.sh"

    logs=$(docker logs "$container_id" 2>&1)
    expect_contains "container log" "$logs" "echo-agent: listening on port 80"
    expect_contains "container log" "$logs" "echo-agent: POST /cgi-bin/echo?x=1 body_bytes=19"

    echo "check.sh: $TARBALL ($actual) serves / and /cgi-bin/echo"
}

main "$@"
