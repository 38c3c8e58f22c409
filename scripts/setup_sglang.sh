#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with the real SGLang server (0.5.23) for the rollout tests.
#
# - The venv is $NSR_SGLANG_VENV (default $ROOT/.venv-sglang); it is never the project's own venv, because
#   sglang 0.5.23 pins torch 2.14.1 (+ torchvision 0.29.1) while the project uses torch 2.13.
# - torch and torchvision are installed first: the CPU build from PyTorch's CPU index where that is reachable
#   ($NSR_TORCH_CPU_INDEX), else PyPI's CUDA build, which runs on the CPU (its disk use: where it is installed,
#   below). Then sglang with --no-deps, then its pure-Python dependencies with torch/torchvision held by a
#   constraints file. pip keeps no download cache. The CUDA-only dependencies (flashinfer, sglang-kernel,
#   flash-attn, deep-gemm, deep-ep, cutlass-dsl, tilelang, ...) are left out: on a CPU machine the server runs with
#   SGLANG_USE_CPU_ENGINE=1 and the test-only stand-in tests/sglang_stub/sgl_kernel on PYTHONPATH (see
#   shared/SGLANG.md, section 1).
# - Idempotent: a venv that already passes the import probe is reused in seconds.
# Prints the venv's python on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${NSR_SGLANG_VENV:-$ROOT/.venv-sglang}
STUB="$ROOT/tests/sglang_stub"
SGLANG_VERSION=0.5.23
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
PY="$VENV/bin/python"

probe() {
  PYTHONPATH="$STUB${PYTHONPATH:+:$PYTHONPATH}" SGLANG_USE_CPU_ENGINE=1 "$PY" - "$SGLANG_VERSION" "$TORCH_VERSION" <<'PYEOF'
import sys
import sglang, torch, torchvision, transformers
import sglang.srt.entrypoints.http_server  # noqa: F401  (the server's whole import chain)
import sglang.srt.weight_sync.tensor_bucket  # noqa: F401
assert sglang.__version__ == sys.argv[1], f"sglang {sglang.__version__} != {sys.argv[1]}"
assert torch.__version__.split("+")[0] == sys.argv[2], f"torch {torch.__version__} != {sys.argv[2]}"
PYEOF
}

TOOL=setup_sglang
VENV_VARIABLE=NSR_SGLANG_VENV
# shellcheck source=scripts/venv_common.sh
. "$ROOT/scripts/venv_common.sh"
reuse_or_create "sglang $SGLANG_VERSION with torch $TORCH_VERSION" 11

LOG="$VENV/setup_sglang.log"
CONSTRAINTS="$VENV/sglang-constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$CONSTRAINTS"
: > "$LOG"

# torch first, on its own: where PyTorch's CPU index is reachable it gives the CPU build; otherwise PyPI's build,
# which carries CUDA's libraries (it runs on the CPU; 7 GB in the venv in all, and at most 8.2 GB of disk measured
# while installing, with the wheels downloaded). One pip call for it and one for the rest keeps the downloaded
# wheels pip holds at once to torch's own.
CPU_INDEX=$(torch_cpu_index "$PY")
if [ -n "$CPU_INDEX" ]; then check_space 3000; else check_space 9000; fi  # MiB; 3000 is an estimate, not measured
venv_pip_install "torch==$TORCH_VERSION, torchvision==$TORCHVISION_VERSION${CPU_INDEX:+ (CPU build from $CPU_INDEX)}" \
  -c "$CONSTRAINTS" ${CPU_INDEX:+--extra-index-url "$CPU_INDEX"} "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
venv_pip_install "sglang==$SGLANG_VERSION (no deps)" -c "$CONSTRAINTS" --no-deps "sglang==$SGLANG_VERSION"
# sglang's requirements (0.5.23 METADATA) less the CUDA-only ones: flashinfer_python, sglang-kernel,
# flash-attn-4, sgl-deep-gemm, sgl-deep-ep, sgl-flash-mla, nvidia-cutlass-dsl, nvidia-mathdx, nvshmem4py-cu13,
# tilelang, quack-kernels, humming-kernels, cuda-python, torch_memory_saver, torchaudio, torchcodec,
# deepseek-recipe, tml-renderers (and the build tools build, ninja). torch and torchvision stay as installed.
venv_pip_install "sglang's pure-Python dependencies" -c "$CONSTRAINTS" \
  "transformers==5.19.0" "tokenizers==0.23.2" "xgrammar==0.2.7" "openai==2.8.0" "openai-harmony==0.0.4" \
  "outlines==0.1.11" "timm==1.0.25" "numba==0.65.1" "apache-tvm-ffi==0.1.11" "compressed-tensors==0.18.0" \
  "blobfile==3.0.0" "sentencepiece==0.2.1" "soundfile==0.13.1" "llguidance>=1.7.6,<2.0.0" "kernels>=0.14.1,<0.15" \
  "mistral_common>=1.11.5" "anthropic>=0.20.0" "prometheus-client>=0.20.0" "pyzmq>=25.1.2" "uvicorn>=0.51" \
  "smg-grpc-servicer>=0.9.0" "python-dateutil<3" \
  aiohttp fastapi uvloop msgspec orjson pybase64 python-multipart partial_json_parser interegular setproctitle \
  xxhash zstandard einops gguf pillow scipy tiktoken modelscope py-spy nvidia-ml-py jsonschema datasets IPython \
  distro easydict numpy packaging psutil pydantic regex requests tqdm watchfiles

if ! probe >>"$LOG" 2>&1; then
  tail -n 15 "$LOG" >&2
  die "sglang $SGLANG_VERSION is installed in $VENV but does not import (log: $LOG)"
fi
"$PY" - <<'PYEOF' >&2
import sglang, torch
print(f"setup_sglang: sglang {sglang.__version__}, torch {torch.__version__}")
PYEOF
echo "$PY"
