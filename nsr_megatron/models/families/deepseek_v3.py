"""DeepSeek-V3 (``model_type: deepseek_v3``): multi-latent attention (MLA, DeepSeek-V2, arXiv:2405.04434) and a
DeepSeekMoE MLP (DeepSeek-V3, arXiv:2412.19437) after ``first_k_dense_replace`` dense layers.

Attention. Queries come from ``x`` directly (``q_lora_rank: null``) or through a rank-``Q`` latent with an RMSNorm;
keys and values share one rank-``C`` latent ``c_kv`` (RMSNorm'd) plus one rotary key of width ``Dr`` shared by all
heads. Per head: ``q = [q_nope (Dn); q_rope (Dr)]``, ``k = [W_k c_kv (Dn); rope(k_rope) (Dr)]``, ``v = W_v c_kv (Dv)``,
softmax scale ``1/sqrt(Dn + Dr)``. DeepSeek lays the rotary dimensions out as interleaved pairs
(``rope_interleave: true``); megatron's MLA rotates them the same way.

Router. ``s = sigmoid(W_r x)`` [E]; experts are chosen by ``s + b`` (``e_score_correction_bias``, aux-loss-free
balancing), within the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its two best
``s + b``); the weights are the chosen ``s`` (not ``s + b``), divided by their sum (``norm_topk_prob``) and times
``routed_scaling_factor``. ``n_shared_experts`` SwiGLU experts of width ``n_shared * moe_intermediate_size`` see
every token. The bias is a buffer, not a parameter: training here keeps it as loaded
(``moe_router_bias_update_rate=0``).

Weights (legend: H hidden, N heads, Q q_lora_rank, C kv_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim,
Dv v_head_dim, E routed experts, Fm expert ffn, S shared experts; ``L.`` = ``model.layers.{i}.``,
``M.`` = ``decoder.layers.{i}.``, attention ``A.`` = ``self_attn.`` / ``self_attention.``):

=============================================================  ==========================================
HF                                                             canonical megatron
=============================================================  ==========================================
``L.input_layernorm.weight`` [H]                               ``M.input_layernorm.weight``
``L.A.q_proj.weight`` [N*(Dn+Dr), H] (no q LoRA)               ``M.A.linear_q_proj.weight``
``L.A.q_a_proj.weight`` [Q, H]                                 ``M.A.linear_q_down_proj.weight``
``L.A.q_a_layernorm.weight`` [Q]                               ``M.A.q_layernorm.weight``
``L.A.q_b_proj.weight`` [N*(Dn+Dr), Q]                         ``M.A.linear_q_up_proj.weight``
``L.A.kv_a_proj_with_mqa.weight`` [C+Dr, H]                    ``M.A.linear_kv_down_proj.weight``
``L.A.kv_a_layernorm.weight`` [C]                              ``M.A.kv_layernorm.weight``
``L.A.kv_b_proj.weight`` [N*(Dn+Dv), C]                        ``M.A.linear_kv_up_proj.weight``
``L.A.o_proj.weight`` [H, N*Dv]                                ``M.A.linear_proj.weight``
``L.post_attention_layernorm.weight`` [H]                      ``M.pre_mlp_layernorm.weight``
``L.mlp.{gate,up,down}_proj.weight`` (dense layers)            ``M.mlp.linear_fc{1,2}.weight``
``L.mlp.gate.weight`` [E, H]                                   ``M.mlp.router.weight``
``L.mlp.gate.e_score_correction_bias`` [E] (buffer)            ``M.mlp.router.expert_bias``
``L.mlp.experts.{e}.{gate,up,down}_proj.weight``               ``M.mlp.experts.experts.linear_fc{1,2}.weight``
``L.mlp.shared_experts.{gate,up}_proj.weight`` [S*Fm, H]       ``M.mlp.shared_experts.linear_fc1.weight``
``L.mlp.shared_experts.down_proj.weight`` [H, S*Fm]            ``M.mlp.shared_experts.linear_fc2.weight``
=============================================================  ==========================================

megatron's local MLA spec keys every layer's norms as above; Transformer Engine's fuses the latent norms into the
up projections (and a dense layer's pre-MLP norm into ``linear_fc1``) and is mapped back to these keys.
Multi-token-prediction layers (``num_nextn_predict_layers``) are not built (a warning says so, and what to do with
their weights): see :meth:`DeepseekV3Family.check`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from nsr_megatron.config import ConfigError, ModelConfig
from nsr_megatron.models.arch import ArchSpec
from nsr_megatron.models.families._sigmoid_moe import (
    SigmoidRouterArch,
    check_sigmoid_router,
    moe_layer,
    sigmoid_router_fields,
    warn_dropped_mtp,
)
from nsr_megatron.models.families.qwen3_moe import Qwen3MoeFamily, expert_rules
from nsr_megatron.models.rules import LAYERS, GateUp, TensorRule, copy_rule

__all__ = ["FAMILY", "DeepseekV3Arch", "DeepseekV3Family"]


@dataclass(frozen=True, kw_only=True)
class DeepseekV3Arch(SigmoidRouterArch):
    """:class:`ArchSpec` plus MLA and DeepSeekMoE sizes (``head_dim`` = Dn + Dr; ``num_kv_heads`` = heads)."""

    q_lora_rank: int = 0  # Q; 0: queries come from one projection of x (``q_lora_rank: null``)
    kv_lora_rank: int = 0  # C
    qk_nope_head_dim: int = 0  # Dn
    qk_rope_head_dim: int = 0  # Dr
    v_head_dim: int = 0  # Dv


def _mla(arch: ArchSpec) -> DeepseekV3Arch:
    assert isinstance(arch, DeepseekV3Arch), type(arch)
    return arch


class DeepseekV3Family(Qwen3MoeFamily):
    """DeepSeek-V3: MLA attention, sigmoid-routed MoE with shared experts after the first dense layers."""

    model_type = "deepseek_v3"
    title = "DeepSeek-V3"
    hf_class = "DeepseekV3ForCausalLM"
    hf_fused_experts = True
    hf_router_suffix = "mlp.gate"

    # ---------------------------------------------------------------- config
    def check(self, hf: Mapping[str, Any]) -> None:
        """Refuse what the megatron model here would not reproduce exactly; warn that MTP layers are dropped."""
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in (None, "default"):
            raise ConfigError(
                f"rope_scaling / rope_parameters rope_type={rope_type!r} is not supported yet for {self.title}; only "
                "plain RoPE (rope_type 'default'). YaRN checkpoints (DeepSeek-V3 ships rope_type 'yarn', factor 40) "
                "need megatron's rope_type='yarn' with the matching mscale, not wired here yet.")
        if hf.get("rope_interleave") is False:
            raise ConfigError(
                "rope_interleave=false is not supported: megatron's multi-latent attention rotates DeepSeek's "
                "interleaved pairs (x0, x1), (x2, x3), ...; use a checkpoint with rope_interleave=true (DeepSeek's).")
        if hf.get("attention_bias"):
            raise ConfigError(
                f"attention_bias=true with model_type={self.model_type!r} is not supported: megatron's MLA "
                "projections have no biases; use a checkpoint with attention_bias=false.")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported; {self.title} MLPs are SwiGLU "
                              "(hidden_act: silu).")
        check_sigmoid_router(hf, title=self.title)
        warn_dropped_mtp(hf, title=self.title)

    def arch(self, hf: Mapping[str, Any]) -> ArchSpec:
        self.check(hf)
        fields = self.arch_fields(hf)
        heads = fields["num_heads"]
        layers = fields["num_layers"]
        experts = int(hf.get("n_routed_experts") or hf.get("num_local_experts") or 0)
        if not experts:
            raise ConfigError("n_routed_experts=0: a DeepSeek-V3 checkpoint has routed experts; check config.json.")
        dense = int(hf.get("first_k_dense_replace") or 0)
        rope_dim, nope_dim = int(hf["qk_rope_head_dim"]), int(hf["qk_nope_head_dim"])
        return DeepseekV3Arch(
            **{**fields, "num_kv_heads": heads, "head_dim": nope_dim + rope_dim, "qkv_bias": False, "qk_norm": False,
               "num_experts": experts, "moe_layers": tuple(i >= dense for i in range(layers))},
            q_lora_rank=int(hf.get("q_lora_rank") or 0),
            kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_nope_head_dim=nope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=int(hf["v_head_dim"]),
            num_shared_experts=int(hf.get("n_shared_experts") or 0),
            moe_groups=int(hf.get("n_group") or 1),
            moe_group_topk=int(hf.get("topk_group") or 1),
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        )

    def transformer_config_class(self) -> Any:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig

    def transformer_fields(self, arch: ArchSpec) -> dict[str, Any]:
        a = _mla(arch)
        fields: dict[str, Any] = dict(
            normalization="RMSNorm",
            layernorm_epsilon=a.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            qk_layernorm=True,  # the q and kv latent norms
            multi_latent_attention=True,
            q_lora_rank=a.q_lora_rank or None,
            kv_lora_rank=a.kv_lora_rank,
            qk_head_dim=a.qk_nope_head_dim,
            qk_pos_emb_head_dim=a.qk_rope_head_dim,
            v_head_dim=a.v_head_dim,
            rope_type="rope",
            rotary_base=a.rope_theta,
            rotary_percent=1.0,
            rotary_scaling_factor=1.0,  # with it MLA's softmax scale is 1/sqrt(Dn + Dr): no YaRN mscale
            mscale=1.0,
            mscale_all_dim=0.0,
            num_moe_experts=a.num_experts,
            moe_ffn_hidden_size=a.moe_ffn_hidden_size,
            moe_router_topk=a.moe_topk,
        )
        fields.update(sigmoid_router_fields(groups=a.moe_groups, group_topk=a.moe_group_topk,
                                            scaling=a.routed_scaling_factor,
                                            shared_width=a.num_shared_experts * a.moe_ffn_hidden_size))
        return fields

    # ---------------------------------------------------------------- model
    def layer_spec(self, arch: ArchSpec, layer: int, *, te: bool, model: ModelConfig) -> Any:
        experts = arch.num_experts if moe_layer(arch, layer) else None
        if te:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

            spec = get_gpt_layer_with_transformer_engine_spec(
                num_experts=experts, moe_grouped_gemm=model.moe_grouped_gemm, qk_layernorm=True,
                multi_latent_attention=True)
            spec.submodules.sharded_state_dict_keys_map = {  # TE's fused norms under the local spec's keys
                "self_attention.linear_q_up_proj.layer_norm_": "self_attention.q_layernorm.",
                "self_attention.linear_kv_up_proj.layer_norm_": "self_attention.kv_layernorm.",
                **({} if experts else {"mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}),
            }
            return spec
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.post_training.modelopt.layers import Linear as ReplicatedLinear

        from nsr_megatron.models.mla_attention import MLAttention, allow_mla_without_te
        from nsr_megatron.models.norm import RMSNorm

        allow_mla_without_te()

        spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=True,
                                        multi_latent_attention=True, normalization="RMSNorm")
        sub = spec.submodules
        sub.input_layernorm = RMSNorm
        sub.pre_mlp_layernorm = RMSNorm
        attn = sub.self_attention.submodules
        attn.core_attention = MLAttention  # the local DotProductAttention cannot take MLA's k/v widths
        # The down projections replicated over TP (as Transformer Engine's spec has them, ``duplicated``), not
        # column-parallel: on that path megatron-core 0.16.1 gathers the rotary key k_rope [s, b, Dr] from the TP
        # shards of ``linear_kv_down_proj`` and every TP rank then uses it for its own heads, but the gather's
        # backward only splits the gradient, so k_rope's gradient (and the down projection's, and everything
        # below) misses the other ranks' heads. Replicated, k_rope is gathered from the sequence-parallel region,
        # whose backward reduce-scatters (sums over the ranks), and the weights are marked sequence-parallel, so
        # their gradients are summed over TP like the norms'.
        attn.linear_q_down_proj = ReplicatedLinear
        attn.linear_kv_down_proj = ReplicatedLinear
        attn.q_layernorm = RMSNorm
        attn.kv_layernorm = RMSNorm
        return spec

    # ---------------------------------------------------------------- conversion
    def attention_rules(self, arch: ArchSpec, i: int) -> list[TensorRule]:
        a = _mla(arch)
        H, N, Q, C = a.hidden_size, a.num_heads, a.q_lora_rank, a.kv_lora_rank
        Dq, Dr, Dn, Dv = a.qk_nope_head_dim + a.qk_rope_head_dim, a.qk_rope_head_dim, a.qk_nope_head_dim, a.v_head_dim
        L, M = f"model.layers.{i}.self_attn.", f"{LAYERS}{i}.self_attention."
        rules = [copy_rule(f"{LAYERS}{i}.input_layernorm.weight", f"model.layers.{i}.input_layernorm.weight", (H,),
                           layer=i)]
        if Q:
            rules += [copy_rule(f"{M}linear_q_down_proj.weight", f"{L}q_a_proj.weight", (Q, H), layer=i),
                      copy_rule(f"{M}q_layernorm.weight", f"{L}q_a_layernorm.weight", (Q,), layer=i),
                      copy_rule(f"{M}linear_q_up_proj.weight", f"{L}q_b_proj.weight", (N * Dq, Q), layer=i,
                                linear=True)]
        else:
            rules.append(copy_rule(f"{M}linear_q_proj.weight", f"{L}q_proj.weight", (N * Dq, H), layer=i, linear=True))
        return rules + [
            copy_rule(f"{M}linear_kv_down_proj.weight", f"{L}kv_a_proj_with_mqa.weight", (C + Dr, H), layer=i),
            copy_rule(f"{M}kv_layernorm.weight", f"{L}kv_a_layernorm.weight", (C,), layer=i),
            copy_rule(f"{M}linear_kv_up_proj.weight", f"{L}kv_b_proj.weight", (N * (Dn + Dv), C), layer=i,
                      linear=True),
            copy_rule(f"{M}linear_proj.weight", f"{L}o_proj.weight", (H, N * Dv), layer=i, linear=True),
        ]

    def mlp_rules(self, arch: ArchSpec, i: int) -> list[TensorRule]:
        a = _mla(arch)
        H, Fd, E, Fm = a.hidden_size, a.ffn_hidden_size, a.num_experts, a.moe_ffn_hidden_size
        Fs = a.num_shared_experts * Fm
        L, M = f"model.layers.{i}.", f"{LAYERS}{i}."
        rules = [copy_rule(f"{M}pre_mlp_layernorm.weight", f"{L}post_attention_layernorm.weight", (H,), layer=i)]
        if not moe_layer(a, i):
            return rules + _swiglu(f"{M}mlp.", f"{L}mlp.", H, Fd, i)
        rules += [
            copy_rule(f"{M}mlp.router.weight", f"{L}mlp.gate.weight", (E, H), layer=i),
            copy_rule(f"{M}mlp.router.expert_bias", f"{L}mlp.gate.e_score_correction_bias", (E,), layer=i),
            *expert_rules(M, L, num_experts=E, hidden=H, ffn=Fm, layer=i),
        ]
        if Fs:
            rules += _swiglu(f"{M}mlp.shared_experts.", f"{L}mlp.shared_experts.", H, Fs, i)
        return rules

    # ---------------------------------------------------------------- memory planner
    def attention_parameters(self, arch: ArchSpec) -> int:
        a = _mla(arch)
        h, n, q, c = a.hidden_size, a.num_heads, a.q_lora_rank, a.kv_lora_rank
        dq = a.qk_nope_head_dim + a.qk_rope_head_dim
        queries = h * q + q * n * dq if q else h * n * dq
        return queries + h * (c + a.qk_rope_head_dim) + c * n * (a.qk_nope_head_dim + a.v_head_dim) \
            + n * a.v_head_dim * h

    def norm_parameters(self, arch: ArchSpec) -> int:
        a = _mla(arch)
        return 2 * a.hidden_size + a.q_lora_rank + a.kv_lora_rank  # input, pre-MLP, q latent, kv latent

    def router_parameters(self, arch: ArchSpec) -> int:
        """The router's weight and the shared experts (both run for every token of an MoE layer, so the planner's
        per-MoE-layer, always-active count is where they belong); the expert bias is a buffer, not a parameter."""
        a = _mla(arch)
        return a.hidden_size * a.num_experts + 3 * a.hidden_size * a.num_shared_experts * a.moe_ffn_hidden_size

    def layer_activations(self, arch: ArchSpec, layer: int, *, act_bytes: int, gemm_bytes: int, tp: int, sp: int,
                          etp: int, te: bool) -> float:
        """As :mod:`.qwen2`'s estimate, with MLA's tensors: the latents (replicated over TP), the up-projected
        queries, keys and values, the attention output and the output-projection input."""
        a = _mla(arch)
        h, n, q, c, g, b = a.hidden_size, a.num_heads, a.q_lora_rank, a.kv_lora_rank, gemm_bytes, act_bytes
        dq, dv = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        norms = (2 if te else 4) * h * b / sp + (2 if te else 4) * (q + c) * b
        attn = (h * g / sp + (q + c + a.qk_rope_head_dim) * g  # down-projection input, up-projection inputs
                + n * (2 * dq + dv) * b / tp  # q, k, v after RoPE
                + n * dv * b / tp + 4 * n / tp  # attention output and log-sum-exp
                + n * dv * g / tp)  # output-projection input
        return norms + attn + self.mlp_activations(a, layer, act_bytes=b, gemm_bytes=g, tp=tp, sp=sp, etp=etp, te=te)

    def mlp_activations(self, arch: ArchSpec, layer: int, *, act_bytes: int, gemm_bytes: int, tp: int, sp: int,
                        etp: int, te: bool) -> float:
        """Routed experts as :mod:`.qwen3_moe`'s estimate, plus the shared experts as a dense MLP of their width."""
        routed = super().mlp_activations(arch, layer, act_bytes=act_bytes, gemm_bytes=gemm_bytes, tp=tp, sp=sp,
                                         etp=etp, te=te)
        a = _mla(arch)
        f = a.num_shared_experts * a.moe_ffn_hidden_size
        if not moe_layer(a, layer) or not f:
            return routed
        glu = 0 if te else f * act_bytes
        return routed + (2 * f * act_bytes + f * gemm_bytes + glu) / tp


def _swiglu(m: str, hf: str, h: int, f: int, layer: int) -> list[TensorRule]:
    """A SwiGLU MLP's ``{gate,up,down}_proj`` under HF prefix ``hf`` <-> ``linear_fc{1,2}`` under megatron ``m``."""
    return [
        TensorRule(key=f"{m}linear_fc1.weight", shape=(2 * f, h), kind=GateUp(),
                   hf_names=(f"{hf}gate_proj.weight", f"{hf}up_proj.weight"), hf_shapes=((f, h), (f, h)), layer=layer,
                   linear=True),
        copy_rule(f"{m}linear_fc2.weight", f"{hf}down_proj.weight", (h, f), layer=layer, linear=True),
    ]


FAMILY = DeepseekV3Family()
