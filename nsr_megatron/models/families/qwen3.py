"""Qwen3 (``model_type: qwen3``): Qwen2's decoder (:mod:`.qwen2`) with RMSNorm on each query and key head (q/k
norms, [D] each) instead of q/k/v biases; ``head_dim`` may differ from hidden / heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nsr_megatron.config import ConfigError
from nsr_megatron.models.families.qwen2 import Qwen2Family

__all__ = ["FAMILY", "Qwen3Family"]


class Qwen3Family(Qwen2Family):
    """Qwen3: q/k norms, no attention biases."""

    model_type = "qwen3"
    title = "Qwen3"
    hf_class = "Qwen3ForCausalLM"

    def check(self, hf: Mapping[str, Any]) -> None:
        super().check(hf)
        if hf.get("attention_bias"):
            raise ConfigError(
                f"attention_bias=true with model_type={self.model_type!r} (biases on q/k/v and o_proj) is not "
                "supported: the output projection has no bias in megatron's layer spec here; use a checkpoint with "
                "attention_bias=false."
            )

    def arch_fields(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().arch_fields(hf), "qkv_bias": False, "qk_norm": True}


FAMILY = Qwen3Family()
