"""GLM-4.5 / GLM-4.6 / GLM-4.5-Air (``model_type: glm4_moe``, Zhipu AI, arXiv:2508.06471): grouped-query attention
with partial RoPE, optional q/k/v biases and q/k norms, and DeepSeek-V3's MoE (:mod:`.deepseek_v3`) after
``first_k_dense_replace`` dense layers.

Attention. Qwen's layout (:mod:`.qwen2`): ``N`` query heads in ``G`` groups of width ``D`` (``head_dim``, which may
differ from hidden / heads); ``attention_bias`` puts biases on q/k/v (never on ``o_proj``), ``use_qk_norm`` an RMSNorm
over each query and key head before RoPE, softmax scale ``1/sqrt(D)``. RoPE rotates only the first
``Dr = int(D * partial_rotary_factor)`` dimensions of each head (transformers' default for this family is 0.5),
as two halves (``rotate_half``: ``x_i`` pairs with ``x_{i + Dr/2}``), with ``inv_freq_j = theta^(-2j/Dr)``; the other
``D - Dr`` pass through. That is megatron's ``rotary_percent = partial_rotary_factor`` (it rounds
``D * rotary_percent`` down as transformers does) with ``rotary_interleaved=False``.

Router, as DeepSeek-V3's. ``s = sigmoid(W_r x)`` [E] in fp32; experts are chosen by ``s + b``
(``e_score_correction_bias``, a buffer kept frozen here) within the ``topk_group`` best of ``n_group`` groups (a
group scores the sum of its two best ``s + b``); the weights are the chosen ``s``, divided by their sum
(``norm_topk_prob``) and times ``routed_scaling_factor``. ``n_shared_experts`` SwiGLU experts of width
``n_shared_experts * moe_intermediate_size`` see every token.

Weights beyond :mod:`.qwen2`'s table (q/k/v biases and q/k norms as there; legend: E routed experts, Fm expert ffn,
S shared experts; ``L.`` = ``model.layers.{i}.``, ``M.`` = ``decoder.layers.{i}.``, MoE layers only):

=============================================================  ==========================================
HF                                                             canonical megatron
=============================================================  ==========================================
``L.mlp.gate.weight`` [E, H]                                   ``M.mlp.router.weight``
``L.mlp.gate.e_score_correction_bias`` [E] (buffer)            ``M.mlp.router.expert_bias``
``L.mlp.experts.{e}.{gate,up}_proj.weight`` [Fm, H]            ``M.mlp.experts.experts.linear_fc1.weight`` [E, 2Fm, H]
``L.mlp.experts.{e}.down_proj.weight`` [H, Fm]                 ``M.mlp.experts.experts.linear_fc2.weight`` [E, H, Fm]
``L.mlp.shared_experts.{gate,up}_proj.weight`` [S*Fm, H]       ``M.mlp.shared_experts.linear_fc1.weight``
``L.mlp.shared_experts.down_proj.weight`` [H, S*Fm]            ``M.mlp.shared_experts.linear_fc2.weight``
=============================================================  ==========================================

Multi-token-prediction layers (``num_nextn_predict_layers``, 1 in GLM-4.5's config and transformers' default) are
not built, as transformers runs the model: a warning says so and what to do with their weights (``model.layers.{N}.*``
for ``N = num_hidden_layers``), which the converter refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nsr_megatron.config import ConfigError
from nsr_megatron.models.arch import ArchSpec
from nsr_megatron.models.families._sigmoid_moe import (
    SigmoidRouterArch,
    check_sigmoid_router,
    moe_layer,
    sigmoid_router_fields,
    warn_dropped_mtp,
)
from nsr_megatron.models.families.deepseek_v3 import _swiglu
from nsr_megatron.models.families.qwen3_moe import Qwen3MoeFamily
from nsr_megatron.models.rules import LAYERS, TensorRule, copy_rule

__all__ = ["FAMILY", "Glm4MoeArch", "Glm4MoeFamily"]

HF_PARTIAL_ROTARY = 0.5  # transformers' Glm4MoeConfig default when config.json names none


@dataclass(frozen=True, kw_only=True)
class Glm4MoeArch(SigmoidRouterArch):
    """:class:`ArchSpec` plus the rotated share of each head and the DeepSeekMoE router sizes."""

    # partial_rotary_factor: RoPE rotates the first int(D * rotary_percent) dimensions of each head (megatron and
    # transformers round the same way)
    rotary_percent: float = 1.0


def _glm(arch: ArchSpec) -> Glm4MoeArch:
    assert isinstance(arch, Glm4MoeArch), type(arch)
    return arch


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE settings, wherever this config keeps them (transformers 5 writes ``rope_parameters``; published
    configs have ``rope_theta`` / ``partial_rotary_factor`` / ``rope_scaling`` at the top level)."""
    return {**hf, **(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}


class Glm4MoeFamily(Qwen3MoeFamily):
    """GLM-4.5: GQA with partial RoPE, optional qkv biases / q-k norms; sigmoid-routed MoE with shared experts."""

    model_type = "glm4_moe"
    title = "GLM-4-MoE"
    hf_class = "Glm4MoeForCausalLM"
    hf_fused_experts = True
    hf_router_suffix = "mlp.gate"

    # ---------------------------------------------------------------- config
    def check(self, hf: Mapping[str, Any]) -> None:
        """Refuse what the megatron model here would not reproduce exactly; warn that MTP layers are dropped."""
        rope = _rope(hf)
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in (None, "default"):
            raise ConfigError(
                f"rope_scaling / rope_parameters rope_type={rope_type!r} is not supported for {self.title}; only "
                "plain RoPE (rope_type 'default', GLM-4.5's). Remove the rope scaling from config.json.")
        theta = float(rope.get("rope_theta") or 10000.0)
        if theta != int(theta):
            raise ConfigError(f"rope_theta={theta} is not an integer: megatron's GPTModel takes an integer rotary "
                              "base, so the frequencies would differ; use a checkpoint with an integral rope_theta.")
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))
        factor = float(rope.get("partial_rotary_factor", HF_PARTIAL_ROTARY))
        rotated = int(head_dim * factor)
        if not 0.0 < factor <= 1.0 or rotated % 2 or not rotated:
            raise ConfigError(
                f"partial_rotary_factor={factor} with head_dim={head_dim} rotates {rotated} dimensions per head; "
                "RoPE rotates pairs, so int(head_dim * partial_rotary_factor) must be even and > 0 (GLM-4.5: "
                "head_dim 128, factor 0.5). Choose a factor that gives an even number of rotated dimensions.")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported; {self.title} MLPs are SwiGLU "
                              "(hidden_act: silu).")
        if int(hf.get("n_shared_experts", 1) or 0) < 1:
            raise ConfigError(
                f"n_shared_experts={hf.get('n_shared_experts')!r}: transformers' {self.hf_class} always builds the "
                "shared-expert MLP (of width n_shared_experts * moe_intermediate_size, so an empty one here), "
                "which megatron has no place for; use a checkpoint with n_shared_experts >= 1 (GLM-4.5: 1).")
        check_sigmoid_router(hf, title=self.title)
        warn_dropped_mtp(hf, title=self.title)

    def arch(self, hf: Mapping[str, Any]) -> ArchSpec:
        self.check(hf)
        rope = _rope(hf)
        fields = self.arch_fields({**hf, "rope_theta": rope.get("rope_theta") or 10000.0})
        experts = int(hf.get("n_routed_experts") or hf.get("num_local_experts") or 0)
        if not experts:
            raise ConfigError("n_routed_experts=0: a GLM-4-MoE checkpoint has routed experts; check config.json.")
        dense = int(hf.get("first_k_dense_replace", 1))  # transformers' default: 1
        return Glm4MoeArch(
            **{**fields, "qkv_bias": bool(hf.get("attention_bias", False)), "qk_norm": bool(hf.get("use_qk_norm")),
               "num_experts": experts, "moe_layers": tuple(i >= dense for i in range(fields["num_layers"]))},
            rotary_percent=float(rope.get("partial_rotary_factor", HF_PARTIAL_ROTARY)),
            num_shared_experts=int(hf.get("n_shared_experts", 1)),
            moe_groups=int(hf.get("n_group") or 1),
            moe_group_topk=int(hf.get("topk_group") or 1),
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        )

    def transformer_fields(self, arch: ArchSpec) -> dict[str, Any]:
        a = _glm(arch)
        fields = super().transformer_fields(a)  # Qwen's attention (biases, q/k norms from the arch), SwiGLU
        fields.update(rotary_interleaved=False)  # transformers' rotate_half: x_i pairs with x_{i + Dr/2}
        fields.update(sigmoid_router_fields(groups=a.moe_groups, group_topk=a.moe_group_topk,
                                            scaling=a.routed_scaling_factor,
                                            shared_width=a.num_shared_experts * a.moe_ffn_hidden_size))
        return fields

    def gpt_model_fields(self, arch: ArchSpec) -> dict[str, Any]:
        return {"rotary_percent": _glm(arch).rotary_percent}

    # ---------------------------------------------------------------- conversion
    def mlp_rules(self, arch: ArchSpec, i: int) -> list[TensorRule]:
        if not moe_layer(arch, i):
            return super().mlp_rules(arch, i)
        a = _glm(arch)
        H, E, Fs = a.hidden_size, a.num_experts, a.num_shared_experts * a.moe_ffn_hidden_size
        L, M = f"model.layers.{i}.", f"{LAYERS}{i}."
        rules = super().mlp_rules(a, i)  # the pre-MLP norm, the router and the routed experts
        at = next(n for n, r in enumerate(rules) if r.key == f"{M}mlp.router.weight") + 1
        rules.insert(at, copy_rule(f"{M}mlp.router.expert_bias", f"{L}mlp.gate.e_score_correction_bias", (E,),
                                   layer=i))
        return rules + _swiglu(f"{M}mlp.shared_experts.", f"{L}mlp.shared_experts.", H, Fs, i)

    # ---------------------------------------------------------------- memory planner
    def router_parameters(self, arch: ArchSpec) -> int:
        """The router's weight and the shared experts (both run for every token of an MoE layer); the expert bias
        is a buffer, not a parameter."""
        a = _glm(arch)
        return a.hidden_size * a.num_experts + 3 * a.hidden_size * a.num_shared_experts * a.moe_ffn_hidden_size

    def mlp_activations(self, arch: ArchSpec, layer: int, *, act_bytes: int, gemm_bytes: int, tp: int, sp: int,
                        etp: int, te: bool) -> float:
        """Routed experts as :mod:`.qwen3_moe`'s estimate, plus the shared experts as a dense MLP of their width."""
        routed = super().mlp_activations(arch, layer, act_bytes=act_bytes, gemm_bytes=gemm_bytes, tp=tp, sp=sp,
                                         etp=etp, te=te)
        a = _glm(arch)
        f = a.num_shared_experts * a.moe_ffn_hidden_size
        if not moe_layer(a, layer) or not f:
            return routed
        glu = 0 if te else f * act_bytes
        return routed + (2 * f * act_bytes + f * gemm_bytes + glu) / tp


FAMILY = Glm4MoeFamily()
