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
