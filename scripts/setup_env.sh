#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install nsr-megatron and what it needs.
#
# - An active virtual environment ($VIRTUAL_ENV) is used as is; otherwise $NSR_VENV (default .venv).
# - torch: an already installed torch is kept (a new venv sees the system's torch, e.g. in NGC images).
#   Without torch: a GPU machine (nvidia-smi lists a GPU) gets the default CUDA build of torch 2.13.0;
#   a CPU machine gets the CPU build (NSR_TORCH_CPU_INDEX, default the PyTorch CPU index, is used
#   when reachable; otherwise pip's configured indexes and find-links are used).
# Prints the python to use on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOL=setup
# shellcheck source=scripts/venv_common.sh
. "$ROOT/scripts/venv_common.sh"
TORCH_VERSION=${NSR_TORCH_VERSION:-2.13.0}
EXTRAS=${NSR_EXTRAS:-dev}

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  VENV=${NSR_VENV:-$ROOT/.venv}
  if [ ! -x "$VENV/bin/python" ]; then
    BASE=${NSR_PYTHON:-python3}
    if "$BASE" -c "import torch" >/dev/null 2>&1; then
      echo "setup: creating $VENV (sharing the system's torch)" >&2
      "$BASE" -m venv --system-site-packages "$VENV"
    else
      echo "setup: creating $VENV" >&2
      "$BASE" -m venv "$VENV"
    fi
  fi
  PY="$VENV/bin/python"
fi

# No download cache: a CUDA build of torch would be kept twice (cache and venv).
pip_install() { "$PY" -m pip install --disable-pip-version-check --no-cache-dir -q "$@"; }

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')" >&2
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found, installing torch==$TORCH_VERSION (CUDA build)" >&2
  pip_install "torch==$TORCH_VERSION"
else
  CPU_INDEX=$(torch_cpu_index "$PY")
  if [ -n "$CPU_INDEX" ]; then
    echo "setup: no GPU, installing torch==$TORCH_VERSION CPU build from $CPU_INDEX" >&2
    pip_install "torch==$TORCH_VERSION" --extra-index-url "$CPU_INDEX"
  else
    echo "setup: no GPU, installing torch==$TORCH_VERSION (CPU build from the configured indexes)" >&2
    pip_install "torch==$TORCH_VERSION"
  fi
fi

pip_install -e "${ROOT}[${EXTRAS}]"
"$PY" - <<'PYEOF' >&2
import torch, megatron.core
print(f"setup: torch {torch.__version__} (cuda={torch.cuda.is_available()}), megatron-core {megatron.core.__version__}")
PYEOF
echo "$PY"
