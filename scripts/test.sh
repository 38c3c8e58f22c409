#!/usr/bin/env bash
# Install what is needed and run the linters and the test suite (CPU, gloo, 2 processes).
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -k losses
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(bash "$ROOT/scripts/setup_env.sh" | tail -n 1)
cd "$ROOT"
"$PY" -m ruff check .
"$PY" -m mypy
exec "$PY" -m pytest "$@"
