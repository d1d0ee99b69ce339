#!/usr/bin/env bash
# Set everything up and run the main job once. The script starts the audit sink, netguard,
# the supervisor, the egress proxy and the gateway, starts the example echo agent from its
# `docker save` tarball served at a local URL, and calls it through the gateway. It prints the
# agent's response, its logs and its audit trail, stops the agent and the services, and
# verifies the signed audit files.
#
# Run as root from a checkout: bash scripts/demo.sh
# It installs what is missing (scripts/deps.sh), then runs the services in the foreground of
# this script and stops them at the end; dockerd, NATS and Redis keep running for the next
# run (scripts/stop-deps.sh stops them). The tarball is served over plain HTTP from
# 127.0.0.1, which only the development profile accepts, so both services log a warning.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEMO="$ROOT/var/demo"
BIN="$ROOT/.venv/bin"
PIDS=()

say() {
    printf '\n== %s\n' "$*"
}

die() {
    echo "demo: error: $*" >&2
    exit 1
}

AUDIT_PID=""

stop_services() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

# The audit sink stops last, so that it writes the services' stop events and a final
# signed checkpoint.
stop_audit_sink() {
    if [[ -n "$AUDIT_PID" ]]; then
        kill "$AUDIT_PID" 2>/dev/null || true
        wait "$AUDIT_PID" 2>/dev/null || true
        AUDIT_PID=""
    fi
}

cleanup() {
    stop_services
    stop_audit_sink
}
trap cleanup EXIT

free_port() {
    "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

show_json() {
    "$BIN/python" -m json.tool
}

wait_for_http() {
    local url=$1 name=$2 attempt
    for attempt in $(seq 1 150); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then
            return
        fi
        sleep 0.2
    done
    tail -n 20 "$DEMO/$name.log" >&2 || true
    die "$name did not respond at $url within 30 s ($attempt attempts); see $DEMO/$name.log"
}

bash "$ROOT/scripts/deps.sh"
# shellcheck source=/dev/null
. "$ROOT/var/agent-runner.env"
export AGENT_RUNNER_PROFILE=development
mkdir -p "$DEMO"

say "building the example agent's image tarball"
bash "$ROOT/examples/echo-agent/build.sh" "$DEMO/www" >/dev/null
DIGEST=$(<"$DEMO/www/echo-agent.digest")
echo "tarball: $DEMO/www/echo-agent.tar"
echo "digest:  $DIGEST"

say "signing the tarball as its publisher would with cosign sign-blob --key"
# A fresh ECDSA P-256 key; the supervisor gets its public half and checks the signature.
SIGNATURE=$("$BIN/python" - "$DEMO/www/echo-agent.tar" "$DEMO/publisher.pub" <<'PY'
import base64, hashlib, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

tarball, public_path = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP256R1())
digest = hashlib.sha256()
with open(tarball, "rb") as handle:
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
signature = key.sign(digest.digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
with open(public_path, "wb") as handle:
    handle.write(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
print(base64.b64encode(signature).decode())
PY
)
echo "public key: $DEMO/publisher.pub"
echo "signature:  $SIGNATURE"

WWW_PORT=$(free_port)
"$BIN/python" -m http.server --bind 127.0.0.1 --directory "$DEMO/www" "$WWW_PORT" \
    >"$DEMO/www.log" 2>&1 &
PIDS+=($!)
IMAGE_URL="http://127.0.0.1:$WWW_PORT/echo-agent.tar"
wait_for_http "$IMAGE_URL" www

say "creating an API key"
rm -f "$DEMO/api-keys"
KEY=$("$BIN/agent-runner" keys create --file "$DEMO/api-keys" --id demo)
echo "key id 'demo' written to $DEMO/api-keys (hashed)"

say "starting the audit sink (signed, hash-chained files in $DEMO/audit)"
# The sink signs its checkpoints with this key. A deployment keeps it like any other secret.
if [[ ! -f "$DEMO/audit-signing.pem" ]]; then
    "$BIN/agent-runner" audit keygen "$DEMO/audit-signing.pem"
fi
"$BIN/agent-runner-audit" --audit-dir "$DEMO/audit" --audit-signing-key "$DEMO/audit-signing.pem" \
    --audit-checkpoint-interval 2 >"$DEMO/audit.log" 2>&1 &
AUDIT_PID=$!
for attempt in $(seq 1 100); do
    grep -q '"audit .* started' "$DEMO/audit.log" && break
    if ((attempt == 100)); then
        tail -n 20 "$DEMO/audit.log" >&2
        die "the audit sink did not start within 20 s; see $DEMO/audit.log"
    fi
    sleep 0.2
done

say "starting netguard, the supervisor, the egress proxy and the gateway (logs in $DEMO)"
API_PORT=$(free_port)
"$BIN/agent-runner-netguard" >"$DEMO/netguard.log" 2>&1 &
PIDS+=($!)
for attempt in $(seq 1 100); do
    grep -q '"netguard .* started"' "$DEMO/netguard.log" && break
    if ((attempt == 100)); then
        tail -n 20 "$DEMO/netguard.log" >&2
        die "netguard did not apply the firewall within 20 s; see $DEMO/netguard.log"
    fi
    sleep 0.2
done
# Loopback image hosts are refused unless a trusted source names the address itself.
"$BIN/agent-runner-supervisor" --trusted-image-sources "http://127.0.0.1:$WWW_PORT/" \
    --image-signing-key "$DEMO/publisher.pub" >"$DEMO/supervisor.log" 2>&1 &
PIDS+=($!)
# The proxy listens on the sandbox network's gateway, which the supervisor creates; it waits
# for it. With no --allowed-domains it denies every request and DNS query of the agent.
"$BIN/agent-runner-proxy" --confdir "$DEMO/proxy" >"$DEMO/proxy.log" 2>&1 &
PIDS+=($!)
"$BIN/agent-runner-api" --api-keys-file "$DEMO/api-keys" --listen-port "$API_PORT" \
    >"$DEMO/api.log" 2>&1 &
PIDS+=($!)
API="http://127.0.0.1:$API_PORT"
wait_for_http "$API/healthz" api
for attempt in $(seq 1 100); do
    grep -q '"firewall state of .* verified=True' "$DEMO/supervisor.log" && break
    if ((attempt == 100)); then
        tail -n 20 "$DEMO/supervisor.log" >&2
        die "the supervisor did not see a verified firewall within 20 s; see $DEMO/supervisor.log"
    fi
    sleep 0.2
done
for attempt in $(seq 1 150); do
    grep -q '"proxy .* started' "$DEMO/proxy.log" && break
    if ((attempt == 150)); then
        tail -n 20 "$DEMO/proxy.log" >&2
        die "the proxy did not start within 30 s; see $DEMO/proxy.log"
    fi
    sleep 0.2
done
echo "gateway: $API"
echo "proxy: transparent, explicit and DNS modes on the sandbox gateway; no domain allowed"
echo "firewall: nftables tables 'inet agent_runner' and 'bridge agent_runner' applied and verified"

say "POST /v1/agents?wait=true"
AGENT=$(curl -fsS -X POST "$API/v1/agents?wait=true" -H "X-API-Key: $KEY" \
    -H 'Content-Type: application/json' \
    -d "{\"image_url\": \"$IMAGE_URL\", \"image_digest\": \"$DIGEST\", \"image_signature\": \"$SIGNATURE\", \"lifetime_seconds\": 300}")
echo "$AGENT" | show_json
AGENT_ID=$(echo "$AGENT" | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["agent_id"])')
STATE=$(echo "$AGENT" | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["state"])')
[[ "$STATE" == ready ]] || die "agent $AGENT_ID is $STATE, not ready"

say "POST /v1/agents/$AGENT_ID/http/cgi-bin/echo?greeting=hello (the agent's response)"
curl -fsS -X POST "$API/v1/agents/$AGENT_ID/http/cgi-bin/echo?greeting=hello" \
    -H "X-API-Key: $KEY" --data-binary 'a request body for the agent'

say "GET /v1/agents/$AGENT_ID/logs"
curl -fsS "$API/v1/agents/$AGENT_ID/logs" -H "X-API-Key: $KEY" | show_json

say "DELETE /v1/agents/$AGENT_ID"
curl -fsS -X DELETE "$API/v1/agents/$AGENT_ID" -H "X-API-Key: $KEY" | show_json

say "audit trail of $AGENT_ID (JetStream stream AUDIT)"
"$BIN/agent-runner" audit events --agent-id "$AGENT_ID" |
    "$BIN/python" -c '
import json, sys
for line in sys.stdin:
    event = json.loads(line)
    print(event["time"], event["service"], event["type"], event["outcome"],
          event.get("reason_code") or "", sep="  ")
'

say "stopping the gateway, the proxy, the supervisor and netguard (which removes its tables)"
stop_services
stop_audit_sink

say "verifying the audit files: hash chain and signed checkpoints"
# The verification key is read from beside the signing key, not from the audit folder, so
# verification fails for a log re-signed with another key.
PUBLIC_KEYS=("$DEMO"/audit-key-*.pub)
"$BIN/agent-runner" audit verify "$DEMO/audit" --key "${PUBLIC_KEYS[0]}"

say "the newest audit records on disk"
"$BIN/agent-runner" audit tail "$DEMO/audit" --lines 8

say "done"
