"""gpt-oss (``model_type: gpt_oss``, OpenAI gpt-oss-20b / -120b): a pre-norm MoE decoder with RMSNorm, grouped-query
attention with q/k/v/o biases and a learned sink per head, sliding-window and full attention alternating by layer,
YaRN RoPE, and in every layer a biased softmax top-k router over biased experts with a clamped SwiGLU.

Attention. Per head h, ``softmax([q k_j / sqrt(D) for the visible j] ++ [sink_h])`` without the sink's column: the
sink takes probability mass and gives back no value (megatron ``softmax_type='learnable'``, its ``softmax_offset``
[N], sharded by head over TP like the heads). A ``sliding_attention`` layer lets query i see keys
``i - W < j <= i`` (transformers' ``kv_idx > q_idx - sliding_window``: W keys, the query's own included), which is
megatron's ``window_size=(W - 1, 0)``; ``full_attention`` layers see every earlier key (``window_attn_skip_freq`` is
the per-layer list). RoPE rotates halves (not interleaved pairs); with ``rope_type: yarn`` (gpt-oss ships factor 32,
``truncate: false``) megatron's ``YarnRotaryEmbedding`` computes the same frequencies and the same cos/sin factor
``0.1 ln(factor) + 1`` as transformers (``yarn_correction_range_round_to_int`` = ``truncate``).

Router. ``l = W_r x + b_r`` [E]; the experts are the top-k of ``l`` and their weights the softmax over those k
logits (megatron: softmax score function, ``moe_router_pre_softmax=False``; the router bias comes with
``add_bias_linear``).

Experts. ``[g; u] = W_1 x + b_1``; ``g = min(g, limit)``, ``u = clamp(u, -limit, limit)``;
``y = W_2 ((u + 1) * g * sigmoid(alpha g)) + b_2``, scaled by the routing weight (the bias too). megatron: the GLU
with ``activation_func_clamp_value=limit``, ``glu_linear_offset=1`` and ``quick_gelu`` (``x sigmoid(1.702 x)``) when
``swiglu_alpha`` is 1.702 (gpt-oss's), else the same function with the config's alpha.

Weights (legend: V vocabulary, H hidden, N query heads, G kv heads, D head_dim, E experts, I expert ffn
(``intermediate_size``); ``L.`` = ``model.layers.{i}.``, ``M.`` = ``decoder.layers.{i}.``). transformers keeps the
experts of a layer fused, and ``save_pretrained`` writes them so (not one tensor per expert): ``gate_up_proj`` is
[E, H, 2I] (``x @ W``, so transposed against megatron's [E, 2I, H]) with gate and up *interleaved* along its last
axis (gate_j at 2j, up_j at 2j + 1), which :class:`~nsr_megatron.models.rules.FusedExperts` maps:

=============================================================  ==========================================
HF                                                             canonical megatron
=============================================================  ==========================================
``model.embed_tokens.weight`` [V, H]                           ``embedding.word_embeddings.weight``
``L.input_layernorm.weight`` [H]                               ``M.self_attention.linear_qkv.layer_norm_weight``
``L.self_attn.{q,k,v}_proj.weight`` [N*D|G*D, H]               ``M.self_attention.linear_qkv.weight`` [(N+2G)*D, H]
``L.self_attn.{q,k,v}_proj.bias`` [N*D|G*D]                    ``M.self_attention.linear_qkv.bias``
``L.self_attn.o_proj.weight`` [H, N*D]                         ``M.self_attention.linear_proj.weight``
``L.self_attn.o_proj.bias`` [H]                                ``M.self_attention.linear_proj.bias``
``L.self_attn.sinks`` [N]                                      ``M.self_attention.core_attention.softmax_offset``
``L.post_attention_layernorm.weight`` [H]                      ``M.mlp.linear_fc1.layer_norm_weight``
``L.mlp.router.weight`` [E, H]                                 ``M.mlp.router.weight``
``L.mlp.router.bias`` [E]                                      ``M.mlp.router.bias``
``L.mlp.experts.gate_up_proj`` [E, H, 2I] (interleaved)        ``M.mlp.experts.experts.linear_fc1.weight`` [E, 2I, H]
``L.mlp.experts.gate_up_proj_bias`` [E, 2I] (interleaved)      ``M.mlp.experts.experts.linear_fc1.bias`` [E, 2I]
``L.mlp.experts.down_proj`` [E, I, H]                          ``M.mlp.experts.experts.linear_fc2.weight`` [E, H, I]
``L.mlp.experts.down_proj_bias`` [E, H]                        ``M.mlp.experts.experts.linear_fc2.bias`` [E, H]
``model.norm.weight`` [H]                                      ``decoder.final_layernorm.weight``
``lm_head.weight`` [V, H] (absent when tied)                   ``output_layer.weight``
=============================================================  ==========================================

The published checkpoints store the experts in MXFP4 (``quantization_config.quant_method: mxfp4``, tensors
``*_blocks`` / ``*_scales``); they are refused with what to do (dequantize to bf16 first, or use a ``-BF16``
export). On the local (CPU) layer spec the sinks run through megatron's unfused attention (scores materialised);
Transformer Engine's attention takes them natively (TE >= 2.8, not tested here: no GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nsr_megatron.config import ConfigError, ModelConfig
from nsr_megatron.models.arch import ArchSpec
from nsr_megatron.models.families.qwen2 import gpt_layer_spec
from nsr_megatron.models.families.qwen3_moe import Qwen3MoeFamily
from nsr_megatron.models.rules import LAYERS, FusedExperts, TensorRule, copy_rule

__all__ = ["FAMILY", "GptOssArch", "GptOssFamily"]

QUICK_GELU_ALPHA = 1.702  # megatron's quick_gelu: x * sigmoid(1.702 x)
_LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True, kw_only=True)
class GptOssArch(ArchSpec):
    """:class:`ArchSpec` plus gpt-oss's attention window, clamped SwiGLU and YaRN settings."""

    sliding_window: int = 0  # W: keys a sliding layer's query sees (its own included)
    sliding_layers: tuple[bool, ...] = ()  # per layer: True = sliding_attention, False = full_attention
    swiglu_alpha: float = QUICK_GELU_ALPHA
    swiglu_limit: float = 7.0
    yarn_factor: float = 0.0  # 0: plain RoPE; else YaRN with this scaling factor
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_truncate: bool = True


def _oss(arch: ArchSpec) -> GptOssArch:
    assert isinstance(arch, GptOssArch), type(arch)
    return arch


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The rope settings of a transformers 5 (``rope_parameters``) or 4.x (``rope_scaling`` + ``rope_theta``)
    config; neither given: ``GptOssConfig``'s default, YaRN factor 32 over 4096 positions."""
    given = hf.get("rope_parameters") or hf.get("rope_scaling")
    if given is None:
        return {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
    return {**given, "rope_type": given.get("rope_type", given.get("type")) or "default"}


def _layer_types(hf: Mapping[str, Any]) -> list[str]:
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")  # GptOssConfig's default: even layers (0, 2, ...) slide
    return list(types) if types is not None else [_LAYER_TYPES[i % 2] for i in range(layers)]


def _gated_sigmoid(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x * sigmoid(alpha x)``: the gate of gpt-oss's SwiGLU for an ``swiglu_alpha`` other than 1.702."""
    return x * torch.sigmoid(alpha * x)


@functools.cache
def _config_class() -> Any:
    """megatron's ``TransformerConfig`` plus the YaRN fields its ``GPTModel`` reads by name when
    ``position_embedding_type='yarn'`` (0.16.1 declares them on no config class). Without YaRN they keep
    ``yarn_rotary_scaling_factor=1``, whose cos/sin factor is exactly 1."""
    from megatron.core.transformer import TransformerConfig

    @dataclass
    class GptOssTransformerConfig(TransformerConfig):
        yarn_rotary_scaling_factor: float = 1.0
        yarn_original_max_position_embeddings: int = 4096
        yarn_beta_fast: float = 32.0
        yarn_beta_slow: float = 1.0
        yarn_mscale: float | None = None  # None: the cos/sin factor is 0.1 ln(factor) + 1, as transformers'
        yarn_mscale_all_dim: float | None = None
        yarn_correction_range_round_to_int: bool = True

        def __post_init__(self) -> None:
            if self.expert_tensor_parallel_size not in (None, 1):
                raise ConfigError(
                    f"parallel.etp={self.expert_tensor_parallel_size}: gpt-oss's experts have biases, which "
                    "megatron-core supports only without expert tensor parallelism; set parallel.etp=1 (with "
                    "parallel.tp > 1, etp defaults to tp) and split the experts with parallel.ep instead.")
            super().__post_init__()

    return GptOssTransformerConfig


@functools.cache
def _sink_attention() -> Any:
    """The project's SDPA core attention with the learned sinks marked as sharded by head over TP (megatron-core
    0.16.1 registers ``softmax_offset`` without the tensor-parallel attributes, so gradient-norm clipping would count
    only TP rank 0's sinks). A softmax offset takes megatron's unfused path (:mod:`nsr_megatron.models.attention`)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    from nsr_megatron.models.attention import SDPAttention

    class SinkAttention(SDPAttention):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if isinstance(self.softmax_offset, torch.nn.Parameter):
                set_tensor_model_parallel_attributes(self.softmax_offset, True, 0, 1)

    return SinkAttention


@functools.cache
def _biased_experts() -> Any:
    """megatron's ``SequentialMLP`` whose experts add their output bias out of place: ``y = (W_2 h + b_2) p``, as
    transformers computes it. megatron-core 0.16.1's ``MLP.forward`` adds a biased expert's ``b_2 p`` to the fc2
    output in place, and on the local spec at expert-TP 1 that output is the identity reduce's own autograd output,
    so the backward fails ("a view ... is being modified inplace"); the forward alone works."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP

    class BiasedExpert(MLP):
        def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
            output, bias = super().forward(hidden_states, **kwargs)  # [T, H], b_2 [H] (not added yet)
            if bias is not None:
                output = output + bias
            if per_token_scale is not None:  # p [T]: the routing weight of each of these tokens for this expert
                output = (output * per_token_scale.unsqueeze(-1)).to(output.dtype)
            return output, None

    class BiasedSequentialMLP(SequentialMLP):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for expert in self.local_experts:
                expert.__class__ = BiasedExpert  # the same module (weights, keys), with the forward above
                bias = expert.linear_fc2.bias
                if bias is not None and not getattr(bias, "allreduce", True):
                    # megatron marks a row-parallel bias ``sequence_parallel``, so finalize_model_grads sums its
                    # gradient over TP; an expert-parallel bias (EP > 1, ETP 1) is already summed over the expert
                    # data-parallel group, which holds those TP ranks: summing again would double it.
                    bias.sequence_parallel = False

    return BiasedSequentialMLP


class GptOssFamily(Qwen3MoeFamily):
    """gpt-oss: biased GQA with sinks, alternating sliding / full layers, biased top-k router, clamped SwiGLU."""

    model_type = "gpt_oss"
    title = "gpt-oss"
    hf_class = "GptOssForCausalLM"
    hf_fused_experts = False  # transformers' module names are the checkpoint's names (fused in both)
    hf_router_suffix = "mlp.router"

    # ---------------------------------------------------------------- config
    def check(self, hf: Mapping[str, Any]) -> None:
        """Refuse MXFP4 (any quantized) checkpoints and what the megatron model here would not reproduce exactly."""
        quant = hf.get("quantization_config")
        if quant:
            method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
            raise ConfigError(
                f"quantization_config.quant_method={method!r}: this {self.title} checkpoint is quantized (the "
                "published gpt-oss weights keep their experts in MXFP4, tensors *_blocks / *_scales), and training "
                "needs bf16/fp32 weights. Dequantize it first: in Python, transformers.AutoModelForCausalLM."
                "from_pretrained(path, quantization_config=transformers.Mxfp4Config(dequantize=True), "
                "dtype=torch.bfloat16).save_pretrained(out) (then drop quantization_config from out/config.json if "
                "it is still there), or start from a bf16 export (the '-BF16' checkpoints).")
        rope = _rope(hf)
        if rope["rope_type"] not in ("default", "yarn"):
            raise ConfigError(f"rope_type={rope['rope_type']!r} is not supported for {self.title}; only 'yarn' "
                              "(gpt-oss's) and 'default' (plain RoPE).")
        extra = {k: rope[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None}
        if rope["rope_type"] == "yarn" and extra:
            raise ConfigError(f"YaRN with {extra} is not supported: megatron's GPT YaRN here reproduces "
                              "transformers' default cos/sin factor 0.1 ln(factor) + 1 only; remove these keys "
                              "(gpt-oss sets none of them).")
        if rope["rope_type"] == "yarn" and not rope.get("factor"):
            raise ConfigError("rope_scaling / rope_parameters with rope_type='yarn' needs 'factor' (gpt-oss: 32).")
        partial = float(hf.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
        if partial != 1.0:
            raise ConfigError(f"partial_rotary_factor={partial} is not supported for {self.title}; only 1.0.")
        if hf.get("attention_bias") is False:
            raise ConfigError(
                "attention_bias=false is not supported: megatron's add_bias_linear gives the output projection, the "
                "router and the experts their biases together, and gpt-oss has them all; use attention_bias=true.")
        types = _layer_types(hf)
        unknown = sorted(set(types) - set(_LAYER_TYPES))
        if unknown or len(types) != int(hf["num_hidden_layers"]):
            raise ConfigError(
                f"layer_types={types!r}: expected num_hidden_layers={hf['num_hidden_layers']} entries, each "
                f"'sliding_attention' or 'full_attention' (unknown: {unknown}).")
        window = hf.get("sliding_window", 128)
        if "sliding_attention" in types and (window is None or int(window) < 1):
            raise ConfigError(f"sliding_window={window!r} with sliding_attention layers: set a positive window "
                              "(gpt-oss: 128) or make every layer full_attention.")
        if not int(hf.get("num_local_experts") or hf.get("num_experts") or 0):
            raise ConfigError(f"num_local_experts is 0: every {self.title} layer is an MoE layer; check config.json.")

    def arch(self, hf: Mapping[str, Any]) -> ArchSpec:
        self.check(hf)
        hf = {"head_dim": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
              "num_experts_per_tok": 4, "intermediate_size": 2880, **hf}  # GptOssConfig's defaults
        fields = self.arch_fields(hf)
        rope = _rope(hf)
        theta = hf.get("rope_theta") or rope.get("rope_theta") or 150000.0
        types = _layer_types(hf)
        yarn = rope["rope_type"] == "yarn"
        experts = int(hf.get("num_local_experts") or hf.get("num_experts") or 0)
        return GptOssArch(
            **{**fields, "head_dim": int(hf["head_dim"] or fields["hidden_size"] // fields["num_heads"]),
               "rope_theta": float(theta), "qkv_bias": True, "qk_norm": False, "num_experts": experts,
               "moe_ffn_hidden_size": fields["ffn_hidden_size"], "norm_topk_prob": True,
               "moe_layers": (True,) * fields["num_layers"]},
            sliding_window=int(hf.get("sliding_window", 128) or 0),
            sliding_layers=tuple(t == "sliding_attention" for t in types),
            swiglu_alpha=float(hf.get("swiglu_alpha", QUICK_GELU_ALPHA)),
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
            yarn_factor=float(rope["factor"]) if yarn else 0.0,
            yarn_original_max_position_embeddings=int(rope.get("original_max_position_embeddings") or 4096),
            yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
            yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
            yarn_truncate=bool(rope.get("truncate", True)),
        )

    def transformer_config_class(self) -> Any:
        return _config_class()

    def transformer_fields(self, arch: ArchSpec) -> dict[str, Any]:
        from megatron.core.activations import quick_gelu

        a = _oss(arch)
        alpha = a.swiglu_alpha
        fields = {
            **super().transformer_fields(a),
            "add_bias_linear": True,  # o_proj, router, experts
            "add_qkv_bias": True,
            "qk_layernorm": False,
            "softmax_type": "learnable",  # the sinks
            "activation_func": quick_gelu if alpha == QUICK_GELU_ALPHA else functools.partial(_gated_sigmoid,
                                                                                               alpha=alpha),
            "activation_func_clamp_value": a.swiglu_limit,
            "glu_linear_offset": 1.0,
        }
        if any(a.sliding_layers):
            fields.update(window_size=(a.sliding_window - 1, 0),  # keys i-W+1 .. i (transformers' window)
                          window_attn_skip_freq=[int(s) for s in a.sliding_layers])  # 1: this layer slides
        if a.yarn_factor:
            fields.update(yarn_rotary_scaling_factor=a.yarn_factor,
                          yarn_original_max_position_embeddings=a.yarn_original_max_position_embeddings,
                          yarn_beta_fast=a.yarn_beta_fast, yarn_beta_slow=a.yarn_beta_slow,
                          yarn_correction_range_round_to_int=a.yarn_truncate)
        return fields

    def gpt_model_fields(self, arch: ArchSpec) -> dict[str, Any]:
        return {"position_embedding_type": "yarn"} if _oss(arch).yarn_factor else {}

    # ---------------------------------------------------------------- model
    def layer_spec(self, arch: ArchSpec, layer: int, *, te: bool, model: ModelConfig) -> Any:
        spec = gpt_layer_spec(arch, experts=arch.num_experts, te=te, model=model)
        if not te:
            spec.submodules.self_attention.submodules.core_attention = _sink_attention()
            spec.submodules.mlp.submodules.experts.module = _biased_experts()
        return spec

    # ---------------------------------------------------------------- conversion
    def attention_rules(self, arch: ArchSpec, i: int) -> list[TensorRule]:
        H, N = arch.hidden_size, arch.num_heads
        L, M = f"model.layers.{i}.self_attn.", f"{LAYERS}{i}.self_attention."
        return [*super().attention_rules(arch, i),
                copy_rule(f"{M}linear_proj.bias", f"{L}o_proj.bias", (H,), layer=i),
                copy_rule(f"{M}core_attention.softmax_offset", f"{L}sinks", (N,), layer=i)]

    def mlp_rules(self, arch: ArchSpec, i: int) -> list[TensorRule]:
        E, H, Im = arch.num_experts, arch.hidden_size, arch.moe_ffn_hidden_size
        L, M = f"model.layers.{i}.", f"{LAYERS}{i}."
        hf, mx = f"{L}mlp.experts.", f"{M}mlp.experts.experts."

        def fused(key: str, name: str, shape: tuple[int, ...], hf_shape: tuple[int, ...], *, linear: bool,
                  interleaved: bool = False) -> TensorRule:
            return TensorRule(key=f"{mx}{key}", shape=shape, hf_names=(f"{hf}{name}",), hf_shapes=(hf_shape,),
                              kind=FusedExperts(transpose=linear, interleaved=interleaved), layer=i, linear=linear)

        return [
            copy_rule(f"{M}mlp.linear_fc1.layer_norm_weight", f"{L}post_attention_layernorm.weight", (H,), layer=i,
                      aliases=(f"{M}pre_mlp_layernorm.weight",)),
            copy_rule(f"{M}mlp.router.weight", f"{L}mlp.router.weight", (E, H), layer=i),
            copy_rule(f"{M}mlp.router.bias", f"{L}mlp.router.bias", (E,), layer=i),
            fused("linear_fc1.weight", "gate_up_proj", (E, 2 * Im, H), (E, H, 2 * Im), linear=True, interleaved=True),
            fused("linear_fc1.bias", "gate_up_proj_bias", (E, 2 * Im), (E, 2 * Im), linear=False, interleaved=True),
            fused("linear_fc2.weight", "down_proj", (E, H, Im), (E, Im, H), linear=True),
            copy_rule(f"{mx}linear_fc2.bias", f"{hf}down_proj_bias", (E, H), layer=i),
        ]

    # ---------------------------------------------------------------- memory planner
    def attention_parameters(self, arch: ArchSpec) -> int:
        return super().attention_parameters(arch) + arch.hidden_size + arch.num_heads  # o_proj bias, sinks

    def expert_parameters(self, arch: ArchSpec) -> int:
        h, f = arch.hidden_size, arch.moe_ffn_hidden_size
        return 3 * h * f + 2 * f + h  # gate, up, down and their biases

    def router_parameters(self, arch: ArchSpec) -> int:
        return (arch.hidden_size + 1) * arch.num_experts  # weight and bias


FAMILY = GptOssFamily()
