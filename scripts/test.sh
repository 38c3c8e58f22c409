#!/usr/bin/env bash
# Install what is needed and run the linters and the test suite (CPU, gloo, 2 processes).
# Builds (or reuses) SGLang's own venv too: the tests run the real SGLang server (scripts/setup_sglang.sh); as
# root it also installs and starts a one-node Slurm cluster (scripts/slurm_cluster.sh) for the sbatch tests.
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -k losses
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(bash "$ROOT/scripts/setup_env.sh" | tail -n 1)
NSR_SGLANG_PYTHON=$(bash "$ROOT/scripts/setup_sglang.sh" | tail -n 1)
export NSR_SGLANG_PYTHON
# A one-node Slurm cluster for the sbatch tests (tests/e2e/test_slurm.py): Debian's packages, daemons as root.
if [ "$(id -u)" = 0 ]; then
  bash "$ROOT/scripts/slurm_cluster.sh" install
  bash "$ROOT/scripts/slurm_cluster.sh" start
else
  echo "test.sh: not root, so no test Slurm cluster: the Slurm tests fail unless one is running" \
       "(sudo bash scripts/slurm_cluster.sh install && sudo bash scripts/slurm_cluster.sh start)." >&2
fi
cd "$ROOT"
"$PY" -m ruff check .
"$PY" -m mypy
exec "$PY" -m pytest "$@"
