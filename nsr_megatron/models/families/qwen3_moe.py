"""Qwen3-MoE (``model_type: qwen3_moe``): Qwen3's attention (:mod:`.qwen3`) with a softmax top-k router over
per-expert SwiGLU MLPs (``norm_topk_prob`` either way). ``decoder_sparse_step`` and ``mlp_only_layers`` may leave
some layers dense (:attr:`ArchSpec.moe_layers`).

MoE layer weights, beyond :mod:`.qwen2`'s table (legend: E experts, Fm expert ffn):

=============================================================  ==========================================
HF (``model.layers.{i}.`` = ``L.``)                            canonical (``decoder.layers.{i}.`` = ``M.``)
=============================================================  ==========================================
``L.mlp.gate.weight`` [E, H] (router)                          ``M.mlp.router.weight``
``L.mlp.experts.{e}.{gate,up}_proj.weight`` [Fm, H]            ``M.mlp.experts.experts.linear_fc1.weight`` [E, 2Fm, H]
``L.mlp.experts.{e}.down_proj.weight`` [H, Fm]                 ``M.mlp.experts.experts.linear_fc2.weight`` [E, H, Fm]
=============================================================  ==========================================

Transformer Engine's MoE layer spec keys the pre-MLP norm of MoE layers ``M.pre_mlp_layernorm.weight``; reading
accepts either name (:attr:`TensorRule.aliases`). megatron keys MoE models' layers one by one (the provider passes
``moe_layer_freq`` as a per-layer list).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nsr_megatron.config import ModelConfig
from nsr_megatron.models.arch import ArchSpec
from nsr_megatron.models.families.qwen2 import gpt_layer_spec
from nsr_megatron.models.families.qwen3 import Qwen3Family
from nsr_megatron.models.rules import LAYERS, Copy, GateUp, TensorRule, copy_rule

__all__ = ["FAMILY", "Qwen3MoeFamily"]


def _moe(arch: ArchSpec, layer: int) -> bool:
    return arch.is_moe and arch.moe_layers[layer]


def expert_rules(m: str, hf: str, *, num_experts: int, hidden: int, ffn: int, layer: int) -> list[TensorRule]:
    """The routed experts of layer ``layer`` (megatron prefix ``m``, HF prefix ``hf``): megatron's stacked
    ``linear_fc1`` [E, 2F, H] and ``linear_fc2`` [E, H, F] from the checkpoint's per-expert SwiGLU weights."""
    E, H, F = num_experts, hidden, ffn
    return [
        TensorRule(key=f"{m}mlp.experts.experts.linear_fc1.weight", shape=(E, 2 * F, H), kind=GateUp(experts=True),
                   hf_names=tuple(f"{hf}mlp.experts.{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up")),
                   hf_shapes=((F, H),) * (2 * E), layer=layer, linear=True),
        TensorRule(key=f"{m}mlp.experts.experts.linear_fc2.weight", shape=(E, H, F), kind=Copy(experts=True),
                   hf_names=tuple(f"{hf}mlp.experts.{e}.down_proj.weight" for e in range(E)),
                   hf_shapes=((H, F),) * E, layer=layer, linear=True),
    ]


class Qwen3MoeFamily(Qwen3Family):
    """Qwen3-MoE: Qwen3 attention, MoE MLPs (dense where the config says so)."""

    model_type = "qwen3_moe"
    title = "Qwen3-MoE"
    hf_class = "Qwen3MoeForCausalLM"
    hf_fused_experts = True  # transformers >= 5 (its conversion_mapping: MergeModulelist + Concatenate(dim=1))
    hf_router_suffix = "mlp.gate"

    # ---------------------------------------------------------------- config
    def arch_fields(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        fields = super().arch_fields(hf)
        # transformers 5 writes num_local_experts where 4.x wrote num_experts.
        experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
        moe_layers: tuple[bool, ...] = ()
        if experts:
            sparse_step = int(hf.get("decoder_sparse_step", 1) or 1)
            dense_only = set(hf.get("mlp_only_layers") or [])
            moe_layers = tuple(i not in dense_only and (i + 1) % sparse_step == 0 for i in range(fields["num_layers"]))
        return {**fields, "num_experts": experts, "moe_layers": moe_layers}

    def transformer_fields(self, arch: ArchSpec) -> dict[str, Any]:
        fields = super().transformer_fields(arch)
        if arch.is_moe:
            fields.update(
                num_moe_experts=arch.num_experts,
                moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
                moe_router_topk=arch.moe_topk,
                # norm_topk_prob=True: softmax over the top-k logits == renormalised top-k probs.
                # norm_topk_prob=False: softmax over all experts, then take the top-k probs as they are.
                moe_router_pre_softmax=not arch.norm_topk_prob,
                moe_router_score_function="softmax",
            )
        return fields

    # ---------------------------------------------------------------- model
    def layer_spec(self, arch: ArchSpec, layer: int, *, te: bool, model: ModelConfig) -> Any:
        return gpt_layer_spec(arch, experts=arch.num_experts if _moe(arch, layer) else None, te=te, model=model)

    # ---------------------------------------------------------------- conversion
    def mlp_rules(self, arch: ArchSpec, i: int) -> list[TensorRule]:
        if not _moe(arch, i):
            return super().mlp_rules(arch, i)
        E, H, Fm = arch.num_experts, arch.hidden_size, arch.moe_ffn_hidden_size
        L, M = f"model.layers.{i}.", f"{LAYERS}{i}."
        return [
            copy_rule(f"{M}mlp.linear_fc1.layer_norm_weight", f"{L}post_attention_layernorm.weight", (H,), layer=i,
                      aliases=(f"{M}pre_mlp_layernorm.weight",)),
            copy_rule(f"{M}mlp.router.weight", f"{L}mlp.gate.weight", (E, H), layer=i),
            *expert_rules(M, L, num_experts=E, hidden=H, ffn=Fm, layer=i),
        ]

    # ---------------------------------------------------------------- memory planner
    def mlp_activations(self, arch: ArchSpec, layer: int, *, act_bytes: int, gemm_bytes: int, tp: int, sp: int,
                        etp: int, te: bool) -> float:
        """An MoE layer, per token: the router's input and probabilities; per routed copy (top-k) the expert's
        fc1 input, fc1 output, fc2 input (and silu(gate) on the local path); the experts' outputs, kept for the
        probability-weighted combine."""
        if not _moe(arch, layer):
            return super().mlp_activations(arch, layer, act_bytes=act_bytes, gemm_bytes=gemm_bytes, tp=tp, sp=sp,
                                           etp=etp, te=te)
        h, k, f, a, g = arch.hidden_size, arch.moe_topk, arch.moe_ffn_hidden_size, act_bytes, gemm_bytes
        glu = 0 if te else f * a
        return (h * a / sp + arch.num_experts * 4  # router input and probabilities
                + k * (h * g + 2 * f * a + f * g + glu) / etp  # per routed copy: fc1 input, fc1 out, fc2 input
                + k * h * a)  # the experts' outputs, kept for the probability-weighted combine


FAMILY = Qwen3MoeFamily()
