#!/usr/bin/env bash
# Run every check and test: lint, format, types, then the unit and integration tests against
# a real dockerd, NATS with JetStream and Redis, which scripts/deps.sh installs and starts.
#
# Run as root from a checkout: bash scripts/test.sh [PYTEST ARGS]
# Exits non-zero on any failure, including pytest collecting no tests (exit status 5).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/deps.sh
# shellcheck source=/dev/null
. var/agent-runner.env

BIN=.venv/bin
echo "test: ruff check" >&2
"$BIN/ruff" check .
echo "test: ruff format --check" >&2
"$BIN/ruff" format --check .
echo "test: mypy" >&2
"$BIN/mypy"
echo "test: docs/configuration.md up to date" >&2
"$BIN/python" scripts/settings_reference.py --check
echo "test: pytest" >&2
"$BIN/pytest" -p no:cacheprovider -q "$@"

# Second pass: the end-to-end, isolation and limit tests again with every agent under gVisor
# (docs/runtime.md). Skipped when pytest arguments select tests, or with
# AGENT_RUNNER_SKIP_RUNSC_PASS=1.
RUNSC_PASS=(
    tests/integration/test_agent_lifecycle.py
    tests/integration/test_agent_logs.py
    tests/integration/test_proxy_e2e.py
    tests/integration/test_firewall_matrix.py
    tests/integration/test_netguard.py
    tests/integration/test_restarts.py
    tests/integration/test_limits.py
    tests/integration/test_filesystem_limits.py
    tests/integration/test_setuid_helper.py
    tests/integration/test_seccomp_profile.py
)
if (($# == 0)) && [[ "${AGENT_RUNNER_SKIP_RUNSC_PASS:-0}" != 1 ]]; then
    echo "test: pytest, agents under runsc" >&2
    AGENT_RUNNER_TEST_RUNTIME=runsc "$BIN/pytest" -p no:cacheprovider -q "${RUNSC_PASS[@]}"
fi
