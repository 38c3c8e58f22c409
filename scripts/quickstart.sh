#!/usr/bin/env bash
# Install what is needed and run the main job on this machine (CPU or GPU).
# Extra arguments are config overrides, e.g.: bash scripts/quickstart.sh run.steps=20
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(bash "$ROOT/scripts/setup_env.sh" | tail -n 1)
cd "$ROOT"
exec "$PY" -m nsr_megatron.cli quickstart "$@"
