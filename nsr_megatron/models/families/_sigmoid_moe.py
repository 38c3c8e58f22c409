"""DeepSeekMoE's router as DeepSeek-V3 (:mod:`.deepseek_v3`) and GLM-4.5 (:mod:`.glm4_moe`) have it, shared by both
families: the checks of what megatron reproduces exactly, the megatron ``TransformerConfig`` fields, and the
warning for multi-token-prediction layers, which neither family trains.

Router. ``s = sigmoid(W_r x)`` [E]; experts are chosen by ``s + b`` (``e_score_correction_bias``, aux-loss-free
balancing, a buffer kept frozen here: ``moe_router_bias_update_rate=0``) within the ``topk_group`` best of
``n_group`` groups; the weights are the chosen ``s``, divided by their sum (``norm_topk_prob``) and times
``routed_scaling_factor``. ``n_shared_experts`` SwiGLU experts of width ``n_shared_experts *
moe_intermediate_size`` see every token.

(A module whose name starts with ``_`` declares no family: the registry passes over it.)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nsr_megatron.config import ConfigError
from nsr_megatron.models.arch import ArchSpec

__all__ = ["SigmoidRouterArch", "check_sigmoid_router", "moe_layer", "sigmoid_router_fields", "warn_dropped_mtp"]


@dataclass(frozen=True, kw_only=True)
class SigmoidRouterArch(ArchSpec):
    """:class:`ArchSpec` plus the router and shared-expert sizes of this MoE."""

    num_shared_experts: int = 0  # S
    moe_groups: int = 1  # n_group
    moe_group_topk: int = 1  # topk_group
    routed_scaling_factor: float = 1.0


def moe_layer(arch: ArchSpec, layer: int) -> bool:
    """Whether layer ``layer`` (0-based) has experts (the first ``first_k_dense_replace`` are dense)."""
    return arch.is_moe and arch.moe_layers[layer]


def check_sigmoid_router(hf: Mapping[str, Any], *, title: str) -> None:
    """Refuse the router settings whose weights or choices megatron's sigmoid router would not reproduce."""
    topk = int(hf.get("num_experts_per_tok") or 0)
    norm = hf.get("norm_topk_prob", True) is not False
    if topk > 1 and not norm:
        raise ConfigError(
            f"norm_topk_prob=false with num_experts_per_tok={topk} is not supported: megatron's sigmoid router "
            f"always divides the top-k weights by their sum; use norm_topk_prob=true ({title}'s).")
    if topk == 1 and norm:
        raise ConfigError(
            "norm_topk_prob=true with num_experts_per_tok=1 is not supported: transformers then weights the one "
            "expert by s / s = 1, megatron's sigmoid router by s (it renormalises only for top-k > 1); set "
            "norm_topk_prob=false (both then weight by s) or route to 2 or more experts.")
    groups, group_topk = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    experts = int(hf.get("n_routed_experts") or hf.get("num_local_experts") or 0)
    if groups > 1 and (experts % groups or group_topk > groups
                       or (group_topk < groups and (topk % group_topk or topk // group_topk != 2))):
        raise ConfigError(
            f"n_group={groups}, topk_group={group_topk}, num_experts_per_tok={topk}, n_routed_experts={experts}: "
            "megatron scores a group by the sum of its top (num_experts_per_tok // topk_group) experts and "
            "transformers by its top 2, so they agree only when n_group divides n_routed_experts and "
            "num_experts_per_tok == 2 * topk_group (DeepSeek-V3: 256 experts, 8 groups, top-4 groups, top-8), or "
            "topk_group == n_group (no group limit).")


def warn_dropped_mtp(hf: Mapping[str, Any], *, title: str) -> None:
    """Warn that the config's multi-token-prediction layers are not built, and what to do with their weights."""
    mtp = int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0)
    if mtp:
        first = int(hf.get("num_hidden_layers") or 0)
        warnings.warn(
            f"num_nextn_predict_layers={mtp}: {title}'s multi-token-prediction layers are not trained here; "
            "the model is built without them, as transformers runs it. Their weights (model.layers."
            f"{first}.* and up) are not converted and the converter refuses a checkpoint that holds them: remove "
            "them from the safetensors files and set num_nextn_predict_layers: 0 in config.json (which also "
            "silences this warning).", stacklevel=3)


def sigmoid_router_fields(*, groups: int, group_topk: int, scaling: float, shared_width: int) -> dict[str, Any]:
    """megatron's ``TransformerConfig`` fields for this router and ``shared_width`` (0: none) of shared experts."""
    fields: dict[str, Any] = dict(
        moe_router_score_function="sigmoid",
        moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,  # RL keeps the pretrained balance bias as it is
        moe_router_topk_scaling_factor=scaling,
        moe_shared_expert_intermediate_size=shared_width or None,
        moe_shared_expert_overlap=False,
    )
    if group_topk < groups:  # with every group chosen, grouping limits nothing
        fields.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    return fields
