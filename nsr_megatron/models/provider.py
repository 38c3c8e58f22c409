"""Policy and reference models from one provider: layer specs, GPTModel, DDP and the optimizer.

Legend: B batch, S sequence, V vocabulary (V/tp per tensor-parallel rank).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from nsr_megatron.config import ConfigError, ModelConfig, OptimizerConfig, ParallelConfig
from nsr_megatron.host_offload import HostOffload
from nsr_megatron.models.families import family
from nsr_megatron.models.hf_config import ArchSpec, transformer_config

__all__ = ["ModelBundle", "build_model", "forward_logits", "fuse_torch_adam", "gather_vocab", "layer_specs",
           "reload_main_params", "use_transformer_engine", "validate_optimizer"]


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
    their parameters' device, as torch's own fused path keeps them. Returns how many parameter groups are fused.

    With ``optimizer.cpu_offload`` the inner optimizer is megatron's ``HybridDeviceOptimizer``, which runs one torch
    AdamW over the host copies and one over the shards left on the device, and asks torch for the fused kernel
    itself (``fused=True`` in its groups). Its own groups are what it copies into those AdamWs before every step,
    so ``fused`` is set there, after a load too; and megatron's placement of their state after a load, which sends
    every state tensor of an AdamW to the host when both are torch's AdamW (no TE), is undone: each goes back to its
    parameter's device. A hybrid over any other optimizer (TE's FusedAdam on the device) is left as it is."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    torch_adams = (torch.optim.Adam, torch.optim.AdamW)
    fused = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner: Any = getattr(opt, "optimizer", None)
        hybrid = isinstance(inner, HybridDeviceOptimizer)
        adams = list(inner.sub_optimizers) if hybrid else [inner]
        if not adams or any(type(a) not in torch_adams for a in adams):
            continue  # TE's or apex's fused Adam, another optimizer, or none: left as it is
        for group in inner.param_groups:
            params = [p for a in adams for g in a.param_groups for p in g["params"]] if hybrid else group["params"]
            if group.get("differentiable") or not params:
                continue
            if all(p.device.type in supported and p.dtype.is_floating_point for p in params):
                group["fused"], group["foreach"] = True, False
                fused += 1
                if not hybrid:
                    _state_to_param_device(inner, params, everything=False)
        if hybrid:
            for adam in adams:
                _state_to_param_device(adam, [p for g in adam.param_groups for p in g["params"]], everything=True)
    return fused


def _state_to_param_device(adam: Any, params: list[torch.Tensor], *, everything: bool) -> None:
    """Each parameter's step count as fp32 on its device (the fused kernel wants it there), and with
    ``everything`` its other state tensors on that device too."""
    for p in params:
        state = adam.state.get(p, {})
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor):
                continue
            if key == "step" and (value.device != p.device or value.dtype != torch.float32):
                state[key] = value.to(device=p.device, dtype=torch.float32)
            elif everything and key != "step" and value.device != p.device:
                state[key] = value.to(p.device)


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION_DTYPES = ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype")


def _have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@contextmanager
def _no_te_version_check() -> Iterator[None]:
    """megatron-core 0.16 ``OptimizerConfig.__post_init__`` asks ``is_te_min_version("2.1.0")`` whenever
    ``use_precision_aware_optimizer`` is set, and without Transformer Engine that compares ``None >= Version``
    (TypeError). No TE is no TE of any version: the answer is False for the duration of the construction (it then
    turns off ``store_param_remainders``, a TE FusedAdam option that nothing here uses). A no-op with TE."""
    if _have_te():
        yield
        return
    from megatron.core.optimizer import optimizer_config

    original = optimizer_config.is_te_min_version
    optimizer_config.is_te_min_version = lambda *args, **kwargs: False
    try:
        yield
    finally:
        optimizer_config.is_te_min_version = original


@contextmanager
def _leaf_fp32_shards() -> Iterator[None]:
    """megatron-core 0.16's distributed optimizer updates fp32 parameters in place through shards that are views of
    them (``model_param.view(-1)[start:end]``, its ``shard_fp32_groups``), and hands them to the inner optimizer. With
    ``cpu_offload`` that is the hybrid optimizer, a torch optimizer, which refuses them (``can't optimize a non-leaf
    Tensor``: the views carry autograd history). For the duration of the construction each such shard is replaced,
    before anything else holds it, by the detached view of the same memory (a leaf; tensor-parallel attributes
    kept): the update still lands in the parameter. Megatron detaches the shards of 16-bit parameters itself."""
    from megatron.core import tensor_parallel
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    name = "_build_model_and_main_param_groups"
    original = DistributedOptimizer.__dict__[name]  # a classmethod

    def build(gbuf_ranges: Any, param_gbuf_map: Any, opt_group_ranges: Any, config: Any) -> Any:
        groups = original.__get__(None, DistributedOptimizer)(gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        leaves: dict[int, torch.Tensor] = {}
        for shards in groups[3]:  # shard_fp32_groups
            for i, shard in enumerate(shards):
                leaf = shard.detach()
                tensor_parallel.copy_tensor_model_parallel_attributes(leaf, shard)
                if hasattr(shard, "shared"):
                    leaf.shared = shard.shared  # type: ignore[attr-defined]
                leaves[id(shard)] = shards[i] = leaf
        for group_range in opt_group_ranges:
            group = group_range["orig_group"]
            group["params"] = [leaves.get(id(p), p) for p in group["params"]]
        return groups

    setattr(DistributedOptimizer, name, staticmethod(build))
    try:
        yield
    finally:
        setattr(DistributedOptimizer, name, original)


def validate_optimizer(opt: OptimizerConfig, parallel: ParallelConfig, model: ModelConfig) -> None:
    """Raise :class:`ConfigError` for ``optimizer.cpu_offload`` / ``precision_aware`` settings that megatron-core 0.16
    asserts on in ``OptimizerConfig`` (or fails on later with a traceback), or that would run and train wrongly."""
    dist_opt = parallel.use_distributed_optimizer
    if opt.cpu_offload and not dist_opt:
        raise ConfigError(
            "optimizer.cpu_offload=true needs parallel.use_distributed_optimizer=true: megatron-core's hybrid CPU "
            "optimizer keeps its host copies of the weights in step only inside the distributed optimizer; set "
            "parallel.use_distributed_optimizer=true.")
    if opt.precision_aware and not dist_opt:
        raise ConfigError(
            "optimizer.precision_aware=true needs parallel.use_distributed_optimizer=true (megatron's precision-aware "
            "optimizer is part of the distributed optimizer); set parallel.use_distributed_optimizer=true or "
            "optimizer.precision_aware=false.")
    if opt.precision_aware and not opt.cpu_offload and not (_have_te() and torch.cuda.is_available()):
        raise ConfigError(
            "optimizer.precision_aware=true needs Transformer Engine's FusedAdam on CUDA, which this machine lacks; "
            "set optimizer.cpu_offload=true (megatron's hybrid CPU optimizer takes the precision-aware path too), "
            "install the 'gpu' extra on a CUDA machine, or set optimizer.precision_aware=false.")
    if opt.precision_aware and opt.cpu_offload and opt.offload_fraction < 1 and model.params_dtype == "fp32":
        raise ConfigError(
            f"optimizer.precision_aware=true with optimizer.offload_fraction={opt.offload_fraction} and "
            "model.params_dtype=fp32: megatron-core's hybrid optimizer would never update the fp32 weights it keeps "
            "on the device (it reads their gradients from .grad, the precision-aware optimizer leaves them in "
            ".decoupled_grad); set optimizer.offload_fraction=1.0, or optimizer.precision_aware=false (with fp32 "
            "weights it saves nothing), or model.params_dtype=bf16.")
    if not opt.precision_aware:
        defaults = OptimizerConfig()
        changed = [f"optimizer.{name}={getattr(opt, name)}" for name in _PRECISION_DTYPES
                   if getattr(opt, name) not in ("fp32", getattr(defaults, name))]
        if changed:
            raise ConfigError(
                f"{', '.join(changed)} applies only with optimizer.precision_aware=true (without it megatron keeps "
                "every optimizer tensor in fp32); set optimizer.precision_aware=true or leave the dtype at fp32.")


def _mcore_optimizer_config(opt: OptimizerConfig, config: Any, parallel: ParallelConfig) -> Any:
    """megatron-core's ``OptimizerConfig`` for ``opt`` and the model's ``TransformerConfig``.

    ``cpu_offload`` builds megatron's ``HybridDeviceOptimizer`` inside the distributed optimizer: the first
    ``offload_fraction`` of this rank's parameter shards (by element count, in parameter order) get a host copy
    that torch's AdamW updates on the CPU; the rest are updated on the device (by TE's FusedAdam, or torch's AdamW
    without TE, which megatron picks for Adam either way). ``offload_overlap`` overlaps the gradient and parameter
    copies with the host update on side CUDA streams; without CUDA there is nothing to overlap and it stays off
    (it would only split the host update into one optimizer per parameter). Host copies are pinned on CUDA only:
    pinning needs an accelerator.

    ``precision_aware`` lets megatron keep the optimizer's tensors in the four dtypes (TE's FusedAdam honours
    them; megatron's hybrid optimizer keeps fp32 moments and fp32 master copies of the 16-bit shards, so with
    ``cpu_offload`` it saves the device-side fp32 main-parameter shards). Without it megatron takes only fp32, so
    the dtypes are passed as fp32 (:func:`validate_optimizer` refuses other values set without it)."""
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig

    cuda = torch.cuda.is_available()
    dtypes = dict.fromkeys(_PRECISION_DTYPES, "fp32")
    if opt.precision_aware:
        dtypes = {name: getattr(opt, name) for name in dtypes}
    with _no_te_version_check():
        return McoreOptimizerConfig(
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
            optimizer_cpu_offload=opt.cpu_offload,
            optimizer_offload_fraction=opt.offload_fraction,
            overlap_cpu_optimizer_d2h_h2d=opt.cpu_offload and opt.offload_overlap and cuda,
            use_torch_optimizer_for_cpu_offload=not _have_te(),
            pin_cpu_grads=cuda,
            pin_cpu_params=cuda,
            use_precision_aware_optimizer=opt.precision_aware,
            **{name: _TORCH_DTYPES[value] for name, value in dtypes.items()},
        )


@torch.no_grad()
def reload_main_params(optimizer: Any) -> None:
    """Make the optimizer's own copies of the weights equal the model's after weights were loaded into the model
    alone (the HF weights, a weights-only checkpoint); a checkpoint with optimizer state sets them itself.

    The distributed optimizer keeps an fp32 main copy of every 16-bit parameter shard (fp32 parameters are updated
    in place) and megatron's ``reload_model_params`` refreshes it. With ``cpu_offload`` megatron 0.16's version
    refreshes only the hybrid optimizer's fp32 copies of 16-bit shards and returns before the main copies, and it
    never refreshes the host copies: both are done here, so the first step starts from the loaded weights and not
    from the initialisation they replaced."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        hybrid = getattr(opt, "optimizer", None)
        if not isinstance(hybrid, HybridDeviceOptimizer):
            opt.reload_model_params()
            continue
        if not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:  # the main copies of 16-bit shards
            for model_group, main_group in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups,
                                               strict=True):
                for model_param, main_param in zip(model_group, main_group, strict=True):
                    shard = opt._get_model_param_range_map(model_param)["param"]
                    main_param.data.copy_(model_param.detach().view(-1)[shard.start:shard.end])
        for param, inner in hybrid.param_to_inner_param.items():  # host copies and fp32 copies
            if inner is not param:
                inner.data.copy_(param.detach())


def _reload_main_params_at_first_step(optimizer: Any) -> None:
    """The optimizer's own copies of the weights (fp32 main copies of 16-bit shards, host copies with
    ``cpu_offload``) are made when it is built, from the initialisation; the weights the run starts from are loaded
    into the model afterwards (the HF weights, a weights-only checkpoint). So the first ``step`` of an optimizer that
    still has no state takes them again from the model (:func:`reload_main_params`), whichever way they were loaded;
    after a checkpoint with optimizer state the state exists and its master weights stand. Later steps are
    megatron's own ``step``."""
    step = optimizer.step

    def first_step(*args: Any, **kwargs: Any) -> Any:
        optimizer.step = step
        inner = [getattr(opt, "optimizer", None) for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
        if all(o is None or len(o.state) == 0 for o in inner):
            reload_main_params(optimizer)
        return step(*args, **kwargs)

    optimizer.step = first_step


def layer_specs(arch: ArchSpec, model: ModelConfig, config: Any) -> Any:
    """A ``TransformerBlockSubmodules`` with one spec per layer of this pipeline stage, as the model's family
    declares them (dense and MoE layers may mix)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    te = use_transformer_engine(model)
    fam = family(arch.model_type)
    per_layer = [fam.layer_spec(arch, i, te=te, model=model) for i in range(arch.num_layers)]
    offset = get_transformer_layer_offset(config)
    per_layer = per_layer[offset : offset + get_num_layers_to_build(config)]
    return TransformerBlockSubmodules(layer_specs=per_layer, layer_norm=fam.final_norm(arch, te=te))


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
    _host: HostOffload | None = field(default=None, repr=False)  # the reference's host copy (offload)

    @property
    def gpt(self) -> Any:
        """The bare GPTModel (unwrapped from DDP)."""
        from nsr_megatron.models.state import unwrap_model

        return unwrap_model(self.module)

    @property
    def offloaded(self) -> bool:
        """True while the weights live only in host memory."""
        return self._host is not None and self._host.offloaded

    def offload_weights(self) -> None:
        """Free the device storage of every parameter; the values stay in the host copy (made once: frozen)."""
        if self.role != "reference":
            raise ValueError("only the frozen reference model can be offloaded (the policy trains).")
        if self._host is None:
            device = next(self.module.parameters()).device
            self._host = HostOffload(device, frozen=True)
        if not self._host.offloaded:
            self._host.offload(self.module.parameters())

    def onload_weights(self) -> None:
        """Give every parameter its storage back and copy its values from the host copy."""
        if self._host is not None:
            self._host.onload()

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
        **{"position_embedding_type": "rope", "rotary_base": int(arch.rope_theta),
           **family(arch.model_type).gpt_model_fields(arch)},
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
    from megatron.core.optimizer import get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,  # the fused log-probs add the output weight's gradient to main_grad directly
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt)
    opt = optimizer or OptimizerConfig()
    validate_optimizer(opt, parallel, model)
    mcore_opt_config = _mcore_optimizer_config(opt, config, parallel)
    with _leaf_fp32_shards() if opt.cpu_offload else contextlib.nullcontext():
        megatron_opt = get_megatron_optimizer(mcore_opt_config, [ddp], use_gloo_process_groups=torch.cuda.is_available())
    fuse_torch_adam(megatron_opt)
    _reload_main_params_at_first_step(megatron_opt)
    return ModelBundle(role=role, arch=arch, config=config, module=ddp, optimizer=megatron_opt,
                       fused_logprobs=model.fused_logprobs)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[..., V/tp] vocabulary shards of every TP rank -> [..., V] (no autograd)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    tp = mpu.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def forward_logits(bundle: ModelBundle, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary fp32 logits [B, S, V] of ``tokens`` [B, S] (positions 0..S-1, causal): one forward-only pass
    through megatron-core's pipeline schedule in eval mode. The logits on the last pipeline stage, None elsewhere;
    every rank of the model's groups must call it."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tokens = tokens.to(device)
    position_ids = torch.arange(tokens.shape[1], device=device).expand_as(tokens)  # [B, S]
    captured: list[torch.Tensor] = []

    def forward_step(data_iterator: Iterator[torch.Tensor], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)  # [B, S]
        output = model(batch, position_ids, None)  # last stage: [B, S, V/tp]

        def capture(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            captured.append(gather_vocab(logits.float()))
            return logits.sum() * 0.0, {}

        return output, capture

    was_training = bundle.module.training
    bundle.module.eval()
    try:
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]),
                                    model=[bundle.module], num_microbatches=1, seq_length=int(tokens.shape[1]),
                                    micro_batch_size=int(tokens.shape[0]), forward_only=True)
    finally:
        bundle.module.train(was_training)
    return captured[0] if mpu.is_pipeline_last_stage() else None
