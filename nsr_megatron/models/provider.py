"""Policy and reference models from one provider: layer specs, GPTModel, DDP and the optimizer.

Legend: B batch, S sequence, V vocabulary (V/tp per tensor-parallel rank).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
from nsr_megatron.models.hf_config import ArchSpec, transformer_config
from nsr_megatron.models.norm import RMSNorm

__all__ = ["ModelBundle", "build_model", "fuse_torch_adam", "layer_specs", "use_transformer_engine"]


def use_transformer_engine(model: ModelConfig) -> bool:
    """TE layers when asked for, or on ``auto`` when TE imports and CUDA is present."""
    if model.transformer_impl == "local":
        return False
    have = importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()
    if model.transformer_impl == "transformer_engine" and not have:
        raise RuntimeError(
            "model.transformer_impl='transformer_engine' but Transformer Engine (with CUDA) is not available; "
            "install the 'gpu' extra on a CUDA machine or set model.transformer_impl=auto."
        )
    return have


def fuse_torch_adam(optimizer: Any) -> int:
    """Run torch's Adam/AdamW inside a megatron optimizer as one fused kernel per step where torch has one
    for the parameters' device (CPU and CUDA): megatron falls back to torch's optimizer without Transformer
    Engine / apex and leaves it to torch's default, which on CPU is one Python-level update per parameter
    (``AdamW.step`` 18.8 ms against 6.9 ms a step on the 7.1M-parameter bench model under torch.profiler,
    bench/RESULTS.md). The update is the same arithmetic, rounded within an ulp of the per-parameter loop. Also
    re-applied after a checkpoint load,
    whose ``param_groups`` carry the saving run's choice and whose step counts may sit on the host: they move to
    their parameters' device, as torch's own fused path keeps them. Returns how many parameter groups are fused."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    fused = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue  # TE's or apex's fused Adam, or another optimizer: left as it is
        for group in inner.param_groups:
            params = group["params"]
            if group.get("differentiable") or not params:
                continue
            if all(p.device.type in supported and p.dtype.is_floating_point for p in params):
                group["fused"], group["foreach"] = True, False
                fused += 1
                for p in params:  # the fused kernel wants each step count as fp32 on its parameter's device
                    state = inner.state.get(p, {})
                    step = state.get("step")
                    if isinstance(step, torch.Tensor) and (step.device != p.device or step.dtype != torch.float32):
                        state["step"] = step.to(device=p.device, dtype=torch.float32)
    return fused


def _local_layer_spec(arch: ArchSpec, moe: bool) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nsr_megatron.models.attention import SDPAttention

    spec = get_gpt_layer_local_spec(
        num_experts=arch.num_experts if moe else None,
        moe_grouped_gemm=False,
        qk_layernorm=arch.qk_norm,
        normalization="RMSNorm",
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


def _te_layer_spec(arch: ArchSpec, moe: bool, model: ModelConfig) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec(
        num_experts=arch.num_experts if moe else None,
        moe_grouped_gemm=model.moe_grouped_gemm,
        qk_layernorm=arch.qk_norm,
    )
    if moe:  # store the MoE layers' pre-MLP norm under the same key as the local spec (and dense TE layers)
        spec.submodules.sharded_state_dict_keys_map = {
            **(spec.submodules.sharded_state_dict_keys_map or {}),
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    return spec


def layer_specs(arch: ArchSpec, model: ModelConfig, config: Any) -> Any:
    """A ``TransformerBlockSubmodules`` with one spec per layer of this pipeline stage
    (dense and MoE layers may mix)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    te = use_transformer_engine(model)
    per_layer = []
    for i in range(arch.num_layers):
        moe = arch.is_moe and arch.moe_layers[i]
        per_layer.append(_te_layer_spec(arch, moe, model) if te else _local_layer_spec(arch, moe))
    offset = get_transformer_layer_offset(config)
    per_layer = per_layer[offset : offset + get_num_layers_to_build(config)]
    if te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm: Any = TENorm
    else:
        final_norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=per_layer, layer_norm=final_norm)


@dataclass(kw_only=True)
class ModelBundle:
    """A built model: ``module`` is what you call; ``optimizer`` is set for the policy only.

    A frozen reference built with ``offload=True`` keeps its weights in host memory between uses: its
    parameters' storage is freed (``untyped_storage().nbytes() == 0``; shapes and the module stay) and
    :meth:`in_use` restores them around each forward. The weights never change, so the host copy is made
    once (pinned on CUDA) and offloading again only frees the device storage.
    """

    role: Literal["policy", "reference"]
    arch: ArchSpec
    config: Any  # TransformerConfig
    module: Any  # megatron DDP-wrapped GPTModel (policy) or bare GPTModel (reference)
    optimizer: Any = None  # megatron MegatronOptimizer
    offload: bool = False  # reference only: keep the weights in host memory between uses
    routing: Any = None  # the routing profiler on this model's routers (profile.routing), or None
    replay: Any = None  # the routing replay of this model's routers (algorithm.routing_replay), or None
    fused_logprobs: bool = False  # model.fused_logprobs: log-probs from the hidden states, no logits tensor
    _host: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def gpt(self) -> Any:
        """The bare GPTModel (unwrapped from DDP)."""
        from nsr_megatron.models.state import unwrap_model

        return unwrap_model(self.module)

    @property
    def offloaded(self) -> bool:
        """True while the weights live only in host memory."""
        return bool(self._host) and all(p.untyped_storage().nbytes() == 0 for p, _ in self._host)

    @torch.no_grad()
    def offload_weights(self) -> None:
        """Free the device storage of every parameter; the values stay in the host copy."""
        if self.role != "reference":
            raise ValueError("only the frozen reference model can be offloaded (the policy trains).")
        if not self._host:
            pin = torch.cuda.is_available()
            self._host = [(p, p.detach().to("cpu", copy=True).pin_memory() if pin else p.detach().clone())
                          for p in self.module.parameters()]
        for p, _ in self._host:
            p.untyped_storage().resize_(0)

    @torch.no_grad()
    def onload_weights(self) -> None:
        """Give every parameter its storage back and copy its values from the host copy."""
        for p, host in self._host:
            if p.untyped_storage().nbytes() == 0:
                p.untyped_storage().resize_(p.numel() * p.element_size())
                p.copy_(host, non_blocking=True)
        if self._host and torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()

    @contextmanager
    def in_use(self) -> Iterator[ModelBundle]:
        """The weights on the device for the duration of the block (a no-op without ``offload``)."""
        if not self.offload:
            yield self
            return
        self.onload_weights()
        try:
            yield self
        finally:
            self.offload_weights()


def build_model(
    arch: ArchSpec,
    *,
    model: ModelConfig,
    parallel: ParallelConfig,
    role: Literal["policy", "reference"] = "policy",
    optimizer: OptimizerConfig | None = None,
    routing_replay: bool = False,
) -> ModelBundle:
    """Build the policy (trainable, megatron DDP + distributed optimizer) or the reference (frozen).

    Needs :func:`nsr_megatron.parallel.initialize` first. Both roles share one architecture and
    one layer spec, so a checkpoint of either loads into the other.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, model, parallel, routing_replay=routing_replay and arch.is_moe)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_specs(arch, model, config),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=mpu.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    if device is not None:
        gpt.to(device)
    if role == "reference":
        gpt.eval()
        for p in gpt.parameters():
            p.requires_grad_(False)
        return ModelBundle(role=role, arch=arch, config=config, module=gpt, offload=model.offload_reference,
                           fused_logprobs=model.fused_logprobs)

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt)
    opt = optimizer or OptimizerConfig()
    mcore_opt_config = McoreOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    megatron_opt = get_megatron_optimizer(mcore_opt_config, [ddp], use_gloo_process_groups=torch.cuda.is_available())
    fuse_torch_adam(megatron_opt)
    return ModelBundle(role=role, arch=arch, config=config, module=ddp, optimizer=megatron_opt,
                       fused_logprobs=model.fused_logprobs)
