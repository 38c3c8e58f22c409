"""The architecture description a model family reads from an HF ``config.json`` (:class:`ArchSpec`).

Its fields are recorded in every checkpoint's ``nsr_meta.json`` (``arch``) and compared at load, so a field here is
part of the checkpoint format.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ArchSpec"]


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """The subset of an HF config that decides the megatron model (all sizes are global, unsharded)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    init_std: float
    num_experts: int = 0  # 0 = dense
    moe_ffn_hidden_size: int = 0
    moe_topk: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()  # per layer: True = MoE MLP, False = dense MLP

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0
