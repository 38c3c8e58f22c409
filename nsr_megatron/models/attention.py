"""Core attention for the local (non-Transformer-Engine) layer spec through torch's fused
``scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materializes the scores: ``baddbmm``, a masked softmax built from
a fresh causal mask, then ``bmm``, and repeats K and V for grouped-query attention. This subclass hands the
same maths to ``torch.nn.functional.scaled_dot_product_attention`` (causal, grouped-query heads without the
repeat), and falls back to megatron's own path for what SDPA does not express here: packed sequences, an
attention bias, a softmax offset, query-key layer scaling, attention dropout while training, or queries and
keys of different lengths under a causal mask.

Shape legend: sq/sk query/key positions, b batch, np query heads and ng key-value groups on this rank, hn head
dimension, hp = np * hn.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

__all__ = ["SDPAttention"]


class SDPAttention(DotProductAttention):
    """megatron-core's ``DotProductAttention`` computed by torch's SDPA where it can be."""

    def _sdpa_applies(self, query: Tensor, key: Tensor, attention_mask: Tensor | None,
                      mask_type: AttnMaskType, attention_bias: Tensor | None, packed_seq_params: Any) -> bool:
        if packed_seq_params is not None or attention_bias is not None or self.softmax_offset is not None:
            return False
        if self.scale_mask_softmax.window_size is not None:  # a sliding-window layer: megatron builds its mask
            return False
        if self.config.apply_query_key_layer_scaling or (self.training and self.config.attention_dropout > 0):
            return False
        if self.num_attention_heads_per_partition % self.num_query_groups_per_partition:
            return False
        if attention_mask is None:
            return mask_type == AttnMaskType.no_mask or (mask_type == AttnMaskType.causal
                                                         and query.size(0) == key.size(0))
        return attention_mask.dtype == torch.bool

    def forward(  # type: ignore[override]
        self,
        query: Tensor,  # [sq, b, np, hn]
        key: Tensor,  # [sk, b, ng, hn]
        value: Tensor,  # [sk, b, ng, hn]
        attention_mask: Tensor | None,  # None, or bool broadcastable to [b, np, sq, sk], True = masked out
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if not self._sdpa_applies(query, key, attention_mask, mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        context = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if attention_mask is None else ~attention_mask,  # SDPA: True = attend
            is_causal=attention_mask is None and mask_type == AttnMaskType.causal,
            scale=self.softmax_scale,
            enable_gqa=k.size(1) != q.size(1),
        )  # [b, np, sq, hn]
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)  # [sq, b, hp]
