"""Hugging Face ``config.json`` -> architecture description -> megatron-core ``TransformerConfig``.

Supported architectures (``model_type``): ``qwen2`` (Qwen2 / Qwen2.5: qkv bias), ``qwen3`` (q/k
RMSNorm, ``head_dim`` may differ from hidden/heads) and ``qwen3_moe`` (Qwen3 attention plus a
softmax top-k router over per-expert SwiGLU MLPs, ``norm_topk_prob`` either way).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nsr_megatron.config import ConfigError, ModelConfig, ParallelConfig

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe")


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


def arch_from_hf(hf: dict[str, Any]) -> ArchSpec:
    """Read an HF config dict; refuse what this project cannot build exactly."""
    model_type = str(hf.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type={model_type!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2 / Qwen2.5, Qwen3, Qwen3-MoE)."
        )
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise ConfigError(f"rope_scaling={rope_scaling!r} is not supported yet; only plain RoPE (rope_scaling: null).")
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise ConfigError(
            "use_sliding_window=true is not supported; set use_sliding_window=false in config.json "
            "(Qwen checkpoints ship it disabled)."
        )
    if model_type in ("qwen3", "qwen3_moe") and hf.get("attention_bias"):
        raise ConfigError(
            f"attention_bias=true with model_type={model_type!r} (biases on q/k/v and o_proj) is not supported: the "
            "output projection has no bias in megatron's layer spec here; use a checkpoint with attention_bias=false."
        )
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    layers = int(hf["num_hidden_layers"])
    head_dim = int(hf.get("head_dim") or hidden // heads)
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    # transformers 5 writes num_local_experts where 4.x wrote num_experts.
    experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0) if model_type == "qwen3_moe" else 0
    moe_layers: tuple[bool, ...] = ()
    if experts:
        sparse_step = int(hf.get("decoder_sparse_step", 1) or 1)
        dense_only = set(hf.get("mlp_only_layers") or [])
        moe_layers = tuple(i not in dense_only and (i + 1) % sparse_step == 0 for i in range(layers))
    return ArchSpec(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=int(hf.get("intermediate_size") or 4 * hidden),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        init_std=float(hf.get("initializer_range", 0.02)),
        num_experts=experts,
        moe_ffn_hidden_size=int(hf.get("moe_intermediate_size") or 0),
        moe_topk=int(hf.get("num_experts_per_tok") or 0),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        moe_layers=moe_layers,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_layout(
    arch: ArchSpec,
    model: ModelConfig,
    parallel: ParallelConfig,
    world_size: int,
    *,
    cuda_available: bool | None = None,
    have_te: bool | None = None,
) -> None:
    """Check that the parallel layout fits the model and the world size, before any work.

    Reads nothing but ``arch`` (from ``config.json``): call it before building models or groups.
    ``cuda_available`` / ``have_te`` default to what this machine has.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    te = importlib.util.find_spec("transformer_engine") is not None if have_te is None else have_te
    tp, pp, ep, etp, cp = parallel.tp, parallel.pp, parallel.ep, parallel.etp, parallel.cp
    heads, groups, layers = arch.num_heads, arch.num_kv_heads, arch.num_layers
    _require(
        heads % tp == 0,
        f"parallel.tp={tp} does not divide num_attention_heads={heads}; choose tp among {_divisors(heads)}.",
    )
    _require(
        groups % tp == 0,
        f"parallel.tp={tp} does not divide num_key_value_heads (query groups)={groups}; "
        f"choose tp among {_divisors(groups)}.",
    )
    _require(
        arch.vocab_size % tp == 0,
        f"parallel.tp={tp} does not divide vocab_size={arch.vocab_size} (the vocabulary is split over TP "
        f"ranks without padding, so the softmax stays exact); choose tp among {_divisors(arch.vocab_size)[:12]}.",
    )
    _require(
        layers % pp == 0,
        f"parallel.pp={pp} does not divide num_hidden_layers={layers}; choose pp among {_divisors(layers)}.",
    )
    model_parallel = tp * pp * cp
    _require(
        world_size % model_parallel == 0,
        f"world size {world_size} is not a multiple of tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}; "
        f"launch a multiple of {model_parallel} processes or shrink the layout.",
    )
    if arch.is_moe:
        _require(
            arch.num_experts % ep == 0,
            f"parallel.ep={ep} does not divide num_experts={arch.num_experts}; "
            f"choose ep among {_divisors(arch.num_experts)}.",
        )
        _require(
            world_size % (ep * etp * pp) == 0,
            f"world size {world_size} is not a multiple of ep*etp*pp = {ep}*{etp}*{pp}; "
            "launch a multiple of that many processes or shrink parallel.ep.",
        )
        _require(
            tp == 1 or parallel.sequence_parallel,
            f"MoE with parallel.tp={tp} needs sequence parallelism (megatron-core requires it for MoE "
            "under tensor parallelism); set parallel.sequence_parallel=true.",
        )
    else:
        _require(ep == 1, f"parallel.ep={ep} needs an MoE model, but this model has no experts; set parallel.ep=1.")
    _require(
        cp == 1 or te,
        f"parallel.cp={cp} needs Transformer Engine attention, which is not installed; install the 'gpu' "
        "extra (pip install 'nsr-megatron[gpu]') on a CUDA machine, or set parallel.cp=1.",
    )
    if model.fp8:
        _require(
            cuda,
            f"model.fp8={model.fp8!r} needs CUDA (FP8 GEMMs run on Hopper or newer GPUs) and none is "
            "available; unset model.fp8 to train in bf16/fp32.",
        )
        _require(
            te,
            f"model.fp8={model.fp8!r} needs Transformer Engine, which is not installed; install the 'gpu' "
            "extra (pip install 'nsr-megatron[gpu]') or unset model.fp8.",
        )
    if model.transformer_impl == "transformer_engine":
        _require(
            te and cuda,
            "model.transformer_impl='transformer_engine' but Transformer Engine with CUDA is not available; "
            "install the 'gpu' extra on a CUDA machine or set model.transformer_impl=auto.",
        )


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(arch: ArchSpec, model: ModelConfig, parallel: ParallelConfig, *,
                       routing_replay: bool = False) -> Any:
    """Build the megatron-core ``TransformerConfig`` for ``arch`` under the given layout (``routing_replay``: give
    every MoE router megatron's ``RouterReplay``, for R2 / R3)."""
    from megatron.core.transformer import TransformerConfig

    dtype = _DTYPES[model.params_dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,
        recompute_granularity=model.recompute or None,
        recompute_method="uniform" if model.recompute == "full" else None,
        recompute_num_layers=1 if model.recompute == "full" else None,
    )
    if arch.is_moe:
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_router_topk=arch.moe_topk,
            # norm_topk_prob=True: softmax over the top-k logits == renormalised top-k probs.
            # norm_topk_prob=False: softmax over all experts, then take the top-k probs as they are.
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_dtype=model.moe_router_dtype,
            moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_token_dispatcher_type=model.moe_token_dispatcher,
            moe_grouped_gemm=model.moe_grouped_gemm,
            moe_layer_freq=[int(x) for x in arch.moe_layers],
            moe_permute_fusion=False,
            moe_enable_routing_replay=routing_replay,
        )
    if model.fp8:
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe, fp8_param=model.fp8_param)
    return TransformerConfig(**kwargs)
