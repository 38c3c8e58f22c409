# GPU image: NGC PyTorch (CUDA, NCCL, apex, Transformer Engine) + nsr-megatron, and SGLang in a venv of its own.
#   docker build -t nsr-megatron .
#   docker run --gpus all --rm nsr-megatron nsr-megatron smoke model.params_dtype=bf16
# Slurm with pyxis/enroot: see the README, "Running at scale".
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/nsr-megatron
COPY setup.py README.md ./
COPY nsr_megatron ./nsr_megatron
COPY examples ./examples
COPY tools ./tools
COPY scripts ./scripts
# The image's torch, Transformer Engine and apex are kept: a fresh venv shares them (FP8 recipes need TE).
ENV NSR_VENV=/opt/venv NSR_EXTRAS=dev
RUN bash scripts/setup_env.sh
# SGLang pins its own torch (0.5.23: torch 2.14.1), so it lives in its own venv with its CUDA kernels; the trainer
# launches it through rollout.sglang.python (the default below) or examples/slurm/train.sbatch (NSR_SGLANG_PYTHON).
RUN python -m venv /opt/venv-sglang \
 && /opt/venv-sglang/bin/pip install --no-cache-dir "sglang[all]==0.5.23"
ENV PATH=/opt/venv/bin:$PATH NSR_SGLANG_PYTHON=/opt/venv-sglang/bin/python
CMD ["nsr-megatron", "--help"]
