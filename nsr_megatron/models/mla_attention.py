"""Core attention for multi-latent attention (MLA) on megatron-core's local layer spec.

megatron-core 0.16.1's ``MLASelfAttention`` builds its core attention with ``k_channels=qk_head_dim +
qk_pos_emb_head_dim`` and ``v_channels=v_head_dim`` (queries and keys are wider than values). Its local layer spec
(``get_gpt_layer_local_spec(multi_latent_attention=True)``) names the local ``DotProductAttention``, whose
``__init__`` takes neither argument: building it raises ``TypeError: __init__() got an unexpected keyword argument
'k_channels'``, so without Transformer Engine (``TEDotProductAttention`` takes both) MLA does not build at all.
:class:`MLAttention` takes both and sizes its output by the value width: ``np * v_head_dim`` per rank.

A second obstacle is in ``transformer/multi_latent_attention.py`` itself: it sets ``HAVE_TE = True`` when
``megatron.core.extensions.transformer_engine`` imports, and that module imports without Transformer Engine too,
leaving ``TELinear`` a ``MagicMock`` instance; ``MLASelfAttention.__init__`` then asks
``isinstance(self.linear_proj, TELinear)`` and raises ``TypeError: isinstance() arg 2 must be a type``.
:func:`allow_mla_without_te` sets that module's ``HAVE_TE`` to what is true, False, when ``transformer_engine``
is not installed (the flag guards nothing else but TE-only FP8/FP4 options).

Shape legend: sq/sk query/key positions, b batch, np heads on this rank, dk query/key head width, dv value head
width.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from nsr_megatron.models.attention import SDPAttention

__all__ = ["MLAttention", "allow_mla_without_te"]


def allow_mla_without_te() -> None:
    """Make megatron's MLA module see that Transformer Engine is absent when it is (a no-op with TE)."""
    if importlib.util.find_spec("transformer_engine") is not None:
        return
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


class MLAttention(SDPAttention):
    """:class:`SDPAttention` with query/key heads of width ``k_channels`` and value heads of width ``v_channels``
    (softmax scale as MLA passes it: ``mscale**2 / sqrt(dk)``)."""

    def __init__(self, *args: Any, k_channels: int | None = None, v_channels: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if k_channels is not None and kwargs.get("softmax_scale") is None:
            self.softmax_scale = k_channels**-0.5
        if v_channels is not None:  # the context is [sq, b, np * dv]
            self.hidden_size_per_attention_head = v_channels
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels
