"""Hugging Face ``config.json`` -> architecture description -> megatron-core ``TransformerConfig``.

The model family of the config's ``model_type`` (:mod:`nsr_megatron.models.families`) reads the config and decides
the fields that are the family's; this module checks the parallel layout against the result and adds the layout,
precision and run options.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from nsr_megatron.config import ConfigError, ModelConfig, ParallelConfig
from nsr_megatron.models.arch import ArchSpec
from nsr_megatron.models.families import family

__all__ = ["ArchSpec", "arch_from_hf", "transformer_config", "validate_layout"]


def arch_from_hf(hf: dict[str, Any]) -> ArchSpec:
    """Read an HF config dict through its family; refuse what this project cannot build exactly (an unknown
    ``model_type`` names the supported families)."""
    return family(str(hf.get("model_type", ""))).arch(hf)


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
        # megatron-core 0.16.1 marks expert weights as expert-parallel (gradients reduced over the expert
        # data-parallel group) only when EP > 1. With EP = 1 and ETP < TP each TP rank runs the whole experts on its
        # own sequence shard, and the experts' gradients would be reduced over the (smaller) data-parallel group:
        # each rank would keep its own tokens' share only.
        _require(
            ep > 1 or etp == tp,
            f"parallel.ep=1 with parallel.etp={etp} < parallel.tp={tp}: megatron-core 0.16.1 would not sum the "
            "experts' gradients over the TP ranks (it treats experts as expert-parallel only when ep > 1), so they "
            f"would miss the other ranks' tokens. Set parallel.ep to 2 or more, or parallel.etp={tp}.",
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
    fam = family(arch.model_type)
    dtype = _DTYPES[model.params_dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
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
    kwargs.update(fam.transformer_fields(arch))
    if arch.is_moe:
        kwargs.update(
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
    return fam.transformer_config_class()(**kwargs)
