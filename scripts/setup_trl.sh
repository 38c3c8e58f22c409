#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with TRL for bench/bench_vs_trl.py.
#
# - The venv is $NSR_TRL_VENV (default $ROOT/.venv-trl, git-ignored). TRL is never a requirement of
#   nsr-megatron: it lives only here, and the benchmark runs TRL's side with this venv's python.
# - torch is installed first, pinned to the project's version (on a CPU machine with the CPU wheel on local
#   disk this picks it; an unpinned torch would pull a multi-GB CUDA build), then trl; pip resolves the rest
#   (transformers, accelerate, datasets, ...).
# - Idempotent: a venv where trl $TRL_VERSION and torch $TORCH_VERSION already import is reused in seconds.
# Prints the venv's python on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${NSR_TRL_VENV:-$ROOT/.venv-trl}
TRL_VERSION=1.16.0
TORCH_VERSION=2.13.0
PY="$VENV/bin/python"

probe() {
  "$PY" - "$TRL_VERSION" "$TORCH_VERSION" <<'PYEOF'
import sys
import torch, trl, transformers, accelerate, datasets  # noqa: F401
from trl import GRPOConfig, GRPOTrainer  # noqa: F401
assert trl.__version__ == sys.argv[1], f"trl {trl.__version__} != {sys.argv[1]}"
assert torch.__version__.split("+")[0] == sys.argv[2], f"torch {torch.__version__} != {sys.argv[2]}"
PYEOF
}

TOOL=setup_trl
VENV_VARIABLE=NSR_TRL_VENV
# shellcheck source=scripts/venv_common.sh
. "$ROOT/scripts/venv_common.sh"
reuse_or_create "trl $TRL_VERSION with torch $TORCH_VERSION" 10

LOG="$VENV/setup_trl.log"
: > "$LOG"

CPU_INDEX=$(torch_cpu_index "$PY")
venv_pip_install "torch==$TORCH_VERSION${CPU_INDEX:+ (CPU build from $CPU_INDEX)}" \
  ${CPU_INDEX:+--extra-index-url "$CPU_INDEX"} "torch==$TORCH_VERSION"
# torch stays pinned while trl's dependencies are resolved, so pip cannot swap in another build.
venv_pip_install "trl==$TRL_VERSION and its dependencies" "trl==$TRL_VERSION" "torch==$TORCH_VERSION"

if ! probe >>"$LOG" 2>&1; then
  tail -n 15 "$LOG" >&2
  die "trl $TRL_VERSION is installed in $VENV but does not import (log: $LOG)"
fi
"$PY" - <<'PYEOF' >&2
import accelerate, datasets, torch, transformers, trl
print(f"setup_trl: trl {trl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, datasets {datasets.__version__}")
PYEOF
echo "$PY"
