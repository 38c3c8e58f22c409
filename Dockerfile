# GPU image: NGC PyTorch (CUDA, NCCL, apex, Transformer Engine) + nsr-megatron.
#   docker build -t nsr-megatron .
#   docker run --gpus all --rm nsr-megatron nsr-megatron smoke model.params_dtype=bf16
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/nsr-megatron
COPY setup.py README.md ./
COPY nsr_megatron ./nsr_megatron
COPY examples ./examples
COPY tools ./tools
COPY scripts ./scripts
# The image's torch (and Transformer Engine) are kept: a fresh venv shares them.
ENV NSR_VENV=/opt/venv NSR_EXTRAS=dev
RUN bash scripts/setup_env.sh
ENV PATH=/opt/venv/bin:$PATH
CMD ["nsr-megatron", "--help"]
