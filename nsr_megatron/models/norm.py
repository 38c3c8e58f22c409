"""RMSNorm for megatron-core's local layer spec, with sequence-parallel support.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``, yet MoE with TP > 1
requires sequence parallelism. This norm computes exactly what Hugging Face's Qwen RMSNorm
computes (fp32 statistics, scale applied in the input dtype) and marks its weight with
``sequence_parallel`` so megatron's ``finalize_model_grads`` all-reduces its gradient over the
tensor-parallel group (each TP rank sees a different slice of the sequence).
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps); x: [..., H], w: [H]."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_init_device(config))
        )
        self.weight.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _init_device(config: TransformerConfig) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
