#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) for a machine with one NVIDIA GPU, PyTorch, Triton and CUDA but no internet.
#
#   bash bench/gpu_check.sh fetch        # where PyPI is reachable: the wheels the GPU machine lacks, into .whl/
#   bash bench/gpu_check.sh run [DIR]    # on the GPU machine (with .whl/ beside the code): installs the wheels
#                                        # into /tmp/site, runs every part, writes DIR/gpu_check.json (default .)
#   bash bench/gpu_check.sh dry-run      # here, on the CPU: every part at toy sizes (checks the script only)
#
# The GPU image is expected to hold torch, transformers, tokenizers, safetensors, numpy, pyyaml, tqdm, psutil,
# matplotlib, tensorboard and pyarrow; megatron-core is the one wheel it lacks. Python 3.12 and x86-64 by
# default: set GPU_PYTHON_VERSION for another interpreter. A few minutes on an H100 or H200; results in
# bench/RESULTS.md ("GPU check").
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WHEELS=("megatron-core==0.16.1")
PYVER=${GPU_PYTHON_VERSION:-3.12}
PY=${PYTHON:-python3}

case "${1:-}" in
  fetch)
    mkdir -p .whl
    for wheel in "${WHEELS[@]}"; do
      "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$wheel"
    done
    ls -l .whl
    ;;
  run)
    out=${2:-.}
    mkdir -p "$out"
    if compgen -G ".whl/*.whl" >/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" bench/gpu_check.py --out "$out/gpu_check.json"
    ;;
  dry-run)
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" bench/gpu_check.py --dry-run --out "${2:-/tmp/gpu_check_dry.json}"
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh fetch | run [DIR] | dry-run [FILE]" >&2
    exit 2
    ;;
esac
