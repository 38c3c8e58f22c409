#!/usr/bin/env bash
# Install what is needed and run the linters and the test suite (CPU, gloo, 2 processes).
# Builds (or reuses) SGLang's own venv too: the tests run the real SGLang server (scripts/setup_sglang.sh).
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -k losses
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(bash "$ROOT/scripts/setup_env.sh" | tail -n 1)
NSR_SGLANG_PYTHON=$(bash "$ROOT/scripts/setup_sglang.sh" | tail -n 1)
export NSR_SGLANG_PYTHON
cd "$ROOT"
"$PY" -m ruff check .
"$PY" -m mypy
exec "$PY" -m pytest "$@"
