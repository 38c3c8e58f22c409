"""Qwen2 / Qwen2.5 (``model_type: qwen2``): a pre-norm decoder with RMSNorm, RoPE, grouped-query attention with
q/k/v biases, and a SwiGLU MLP. Qwen3 and Qwen3-MoE (:mod:`.qwen3`, :mod:`.qwen3_moe`) build on this module.

Weights (legend: V vocabulary, H hidden, N query heads, G query groups (kv heads), D head_dim (may differ from
H/N), F dense ffn; no vocabulary padding: V is the config's). Layer i: ``L.`` = ``model.layers.{i}.`` on the HF
side, ``M.`` = ``decoder.layers.{i}.`` on the megatron side (stacked into ``decoder.layers.`` by the converter
when megatron stacks them, see :func:`nsr_megatron.convert.mapping.weight_rules`):

=============================================================  ==========================================
HF                                                             canonical megatron
=============================================================  ==========================================
``model.embed_tokens.weight`` [V, H]                           ``embedding.word_embeddings.weight``
``L.input_layernorm.weight`` [H]                               ``M.self_attention.linear_qkv.layer_norm_weight``
``L.self_attn.{q,k,v}_proj.weight`` [N*D|G*D, H]               ``M.self_attention.linear_qkv.weight`` [(N+2G)*D, H]
``L.self_attn.{q,k,v}_proj.bias`` (qwen2) [N*D|G*D]            ``M.self_attention.linear_qkv.bias`` [(N+2G)*D]
``L.self_attn.{q,k}_norm.weight`` (qwen3) [D]                  ``M.self_attention.{q,k}_layernorm.weight``
``L.self_attn.o_proj.weight`` [H, N*D]                         ``M.self_attention.linear_proj.weight``
``L.post_attention_layernorm.weight`` [H]                      ``M.mlp.linear_fc1.layer_norm_weight``
``L.mlp.{gate,up}_proj.weight`` [F, H]                         ``M.mlp.linear_fc1.weight`` [2F, H] = [gate; up]
``L.mlp.down_proj.weight`` [H, F]                              ``M.mlp.linear_fc2.weight``
``model.norm.weight`` [H]                                      ``decoder.final_layernorm.weight``
``lm_head.weight`` [V, H] (absent when tied)                   ``output_layer.weight`` (absent when tied)
=============================================================  ==========================================

The q/k norm rows (qwen3) follow :attr:`ArchSpec.qk_norm`, the bias rows :attr:`ArchSpec.qkv_bias`, so the
families that share this layout share this code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F

from nsr_megatron.config import ConfigError, ModelConfig
from nsr_megatron.models.arch import ArchSpec
from nsr_megatron.models.families import ModelFamily
from nsr_megatron.models.rules import LAYERS, QKV, GateUp, TensorRule, copy_rule

__all__ = ["FAMILY", "Qwen2Family", "gpt_layer_spec"]


def gpt_layer_spec(arch: ArchSpec, *, experts: int | None, te: bool, model: ModelConfig) -> Any:
    """megatron's GPT layer spec (Transformer Engine's with ``te``, else the local one with this project's RMSNorm
    and SDPA attention), with ``experts`` experts in its MLP (None: a dense MLP) and q/k norms when
    ``arch.qk_norm``."""
    if te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=model.moe_grouped_gemm, qk_layernorm=arch.qk_norm
        )
        if experts:  # store the MoE layers' pre-MLP norm under the same key as the local spec (and dense TE layers)
            spec.submodules.sharded_state_dict_keys_map = {
                **(spec.submodules.sharded_state_dict_keys_map or {}),
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            }
        return spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nsr_megatron.models.attention import SDPAttention
    from nsr_megatron.models.norm import RMSNorm

    spec = get_gpt_layer_local_spec(
        num_experts=experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm, normalization="RMSNorm"
    )
    # WrappedTorchNorm refuses sequence parallelism; swap in our RMSNorm (same maths as HF's).
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAttention  # megatron's local attention through torch's fused SDPA
    if arch.qk_norm:
        attn.q_layernorm = RMSNorm
        attn.k_layernorm = RMSNorm
    return spec


class Qwen2Family(ModelFamily):
    """Qwen2 / Qwen2.5: q/k/v biases, no q/k norms, dense SwiGLU MLPs."""

    model_type = "qwen2"
    title = "Qwen2 / Qwen2.5"
    hf_class = "Qwen2ForCausalLM"

    # ---------------------------------------------------------------- config
    def check(self, hf: Mapping[str, Any]) -> None:
        """Refuse settings the megatron model here would not reproduce exactly."""
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ConfigError(
                f"rope_scaling={rope_scaling!r} is not supported yet; only plain RoPE (rope_scaling: null)."
            )
        if hf.get("use_sliding_window") and hf.get("sliding_window"):
            raise ConfigError(
                "use_sliding_window=true is not supported; set use_sliding_window=false in config.json "
                "(Qwen checkpoints ship it disabled)."
            )

    def arch_fields(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """The :class:`ArchSpec` fields (the MoE sizes are read as given: the arch record of a checkpoint keeps
        them, and :attr:`ArchSpec.num_experts` alone makes a model MoE)."""
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return dict(
            model_type=self.model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(hf.get("intermediate_size") or 4 * hidden),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True,
            qk_norm=False,
            init_std=float(hf.get("initializer_range", 0.02)),
            moe_ffn_hidden_size=int(hf.get("moe_intermediate_size") or 0),
            moe_topk=int(hf.get("num_experts_per_tok") or 0),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        )

    def arch(self, hf: Mapping[str, Any]) -> ArchSpec:
        self.check(hf)
        return ArchSpec(**self.arch_fields(hf))

    def transformer_fields(self, arch: ArchSpec) -> dict[str, Any]:
        return dict(
            normalization="RMSNorm",
            layernorm_epsilon=arch.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=arch.qkv_bias,
            qk_layernorm=arch.qk_norm,
        )

    # ---------------------------------------------------------------- model
    def layer_spec(self, arch: ArchSpec, layer: int, *, te: bool, model: ModelConfig) -> Any:
        return gpt_layer_spec(arch, experts=None, te=te, model=model)

    def final_norm(self, arch: ArchSpec, *, te: bool) -> Any:
        if te:
            from megatron.core.extensions.transformer_engine import TENorm

            return TENorm
        from nsr_megatron.models.norm import RMSNorm

        return RMSNorm

    # ---------------------------------------------------------------- conversion
    def weight_rules(self, arch: ArchSpec) -> list[TensorRule]:
        V, H, L = arch.vocab_size, arch.hidden_size, arch.num_layers
        rules = [copy_rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", (V, H), layer=-1,
                           tied_hf_name="lm_head.weight")]
        for i in range(L):
            rules.extend(self.attention_rules(arch, i))
            rules.extend(self.mlp_rules(arch, i))
        rules.append(copy_rule("decoder.final_layernorm.weight", "model.norm.weight", (H,), layer=L))
        if not arch.tie_word_embeddings:
            rules.append(copy_rule("output_layer.weight", "lm_head.weight", (V, H), layer=L))
        return rules

    def attention_rules(self, arch: ArchSpec, i: int) -> list[TensorRule]:
        """Layer ``i``'s input norm and attention."""
        H, N, G, D = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
        L, M = f"model.layers.{i}.", f"{LAYERS}{i}."
        qkv = QKV(heads_per_group=N // G, head_dim=D, groups=G)
        rules = [
            copy_rule(f"{M}self_attention.linear_qkv.layer_norm_weight", f"{L}input_layernorm.weight", (H,), layer=i),
            TensorRule(key=f"{M}self_attention.linear_qkv.weight", shape=((N + 2 * G) * D, H), kind=qkv,
                       hf_names=tuple(f"{L}self_attn.{p}_proj.weight" for p in "qkv"),
                       hf_shapes=((N * D, H), (G * D, H), (G * D, H)), layer=i, linear=True),
        ]
        if arch.qkv_bias:
            rules.append(TensorRule(key=f"{M}self_attention.linear_qkv.bias", shape=((N + 2 * G) * D,), kind=qkv,
                                    hf_names=tuple(f"{L}self_attn.{p}_proj.bias" for p in "qkv"),
                                    hf_shapes=((N * D,), (G * D,), (G * D,)), layer=i))
        if arch.qk_norm:
            rules.append(copy_rule(f"{M}self_attention.q_layernorm.weight", f"{L}self_attn.q_norm.weight", (D,),
                                   layer=i))
            rules.append(copy_rule(f"{M}self_attention.k_layernorm.weight", f"{L}self_attn.k_norm.weight", (D,),
                                   layer=i))
        rules.append(copy_rule(f"{M}self_attention.linear_proj.weight", f"{L}self_attn.o_proj.weight", (H, N * D),
                               layer=i, linear=True))
        return rules

    def mlp_rules(self, arch: ArchSpec, i: int) -> list[TensorRule]:
        """Layer ``i``'s pre-MLP norm and dense SwiGLU MLP."""
        H, Fd = arch.hidden_size, arch.ffn_hidden_size
        L, M = f"model.layers.{i}.", f"{LAYERS}{i}."
        return [
            copy_rule(f"{M}mlp.linear_fc1.layer_norm_weight", f"{L}post_attention_layernorm.weight", (H,), layer=i),
            TensorRule(key=f"{M}mlp.linear_fc1.weight", shape=(2 * Fd, H), kind=GateUp(),
                       hf_names=(f"{L}mlp.gate_proj.weight", f"{L}mlp.up_proj.weight"), hf_shapes=((Fd, H), (Fd, H)),
                       layer=i, linear=True),
            copy_rule(f"{M}mlp.linear_fc2.weight", f"{L}mlp.down_proj.weight", (H, Fd), layer=i, linear=True),
        ]

    # ---------------------------------------------------------------- memory planner
    def attention_parameters(self, arch: ArchSpec) -> int:
        h, d = arch.hidden_size, arch.head_dim
        q, kv = arch.num_heads * d, arch.num_kv_heads * d
        return h * q + 2 * h * kv + q * h + (q + 2 * kv if arch.qkv_bias else 0)

    def norm_parameters(self, arch: ArchSpec) -> int:
        return 2 * arch.hidden_size + (2 * arch.head_dim if arch.qk_norm else 0)

    def dense_mlp_parameters(self, arch: ArchSpec) -> int:
        return 3 * arch.hidden_size * arch.ffn_hidden_size  # gate, up, down

    def expert_parameters(self, arch: ArchSpec) -> int:
        return 3 * arch.hidden_size * arch.moe_ffn_hidden_size  # a SwiGLU expert: gate, up, down

    def router_parameters(self, arch: ArchSpec) -> int:
        return arch.hidden_size * arch.num_experts

    def layer_activations(self, arch: ArchSpec, layer: int, *, act_bytes: int, gemm_bytes: int, tp: int, sp: int,
                          etp: int, te: bool) -> float:
        """Korthikanti et al. 2022 with flash attention (no ``s x s`` term). Norm inputs and the residual stream
        are sequence-parallel (/sp); everything inside attention and the MLP is split over TP. TE's fused norms
        keep their input (and a per-token rstd); megatron's local path (torch RMSNorm, as on CPU) also keeps the
        normalized output, and the q/k norms' input and output."""
        h, d = arch.hidden_size, arch.head_dim
        q, kv = arch.num_heads * d, arch.num_kv_heads * d
        a, g = act_bytes, gemm_bytes
        norms = (2 if te else 4) * h * a / sp + (0 if te or not arch.qk_norm else 2 * (q + kv) * a / tp)
        attn = (h * g / sp  # QKV GEMM input (gathered under SP, saved sharded)
                + (q + 2 * kv) * a / tp  # Q, K, V after RoPE
                + q * a / tp + 4 * arch.num_heads / tp  # attention output and log-sum-exp (flash)
                + q * g / tp)  # output-projection input
        return norms + attn + self.mlp_activations(arch, layer, act_bytes=a, gemm_bytes=g, tp=tp, sp=sp, etp=etp,
                                                   te=te)

    def mlp_activations(self, arch: ArchSpec, layer: int, *, act_bytes: int, gemm_bytes: int, tp: int, sp: int,
                        etp: int, te: bool) -> float:
        """Per token, a dense SwiGLU MLP: fc1 input, fc1 output, fc2 input; megatron's local SwiGLU (silu(gate) * up
        in torch) also keeps silu(gate) for the product's backward, TE's fused SwiGLU only its input."""
        h, f, a, g = arch.hidden_size, arch.ffn_hidden_size, act_bytes, gemm_bytes
        glu = 0 if te else f * a
        return h * g / sp + (2 * f * a + f * g + glu) / tp


FAMILY = Qwen2Family()
