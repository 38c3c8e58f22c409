"""The memory planner against the real megatron-core model on CPU (fp32, megatron's local layers), in one process
and under TP=2 + SP, EP=2 and PP=2 (2 gloo ranks, 2 micro-batches):

- per-GPU parameters exactly and gradients within the distributed optimizer's bucket padding, counted from the
  tensors of the rank whose pipeline stage the plan reports;
- activations plus logits within 20% of the measured peak of what autograd keeps for the backward (every saved
  tensor's storage, parameters excluded, from being saved until its backward frees it), with and without full
  recompute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_routing_profiler import MOE
from tests.spawn import run_workers

# A little wider than the routing tests' model, so that activations dominate the small tensors.
PLAN_MOE = {**MOE, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "moe_intermediate_size": 64}
SEQS, S, MICRO = 2, 64, 2  # sequences per micro-batch, tokens per sequence, micro-batches


class _Held:
    """A saved tensor, counted while autograd holds it (one count per storage)."""

    def __init__(self, t: torch.Tensor, meter: dict[str, Any]) -> None:
        self.t, self.meter = t, meter
        ptr = t.untyped_storage().data_ptr()
        self.ptr = None if ptr in meter["params"] or ptr == 0 else ptr
        if self.ptr is None:
            return
        entry = meter["alive"].setdefault(self.ptr, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            meter["now"] += entry[0]
            meter["peak"] = max(meter["peak"], meter["now"])
        entry[1] += 1

    def __del__(self) -> None:
        if self.ptr is None:
            return
        entry = self.meter["alive"][self.ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.meter["now"] -= entry[0]
            del self.meter["alive"][self.ptr]


def _worker(rank: int, world: int, init: str, hf_dir: str, out: str, layout: dict[str, Any], recompute: str) -> None:
    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.trainer import actor

    par = ParallelConfig(**layout)
    arch = arch_from_hf(read_hf_config(hf_dir))
    state = parallel.initialize(par, seed=3, rank=rank, world_size=world, init_method=init)
    policy = build_model(arch, model=ModelConfig(hf_path=hf_dir, recompute=recompute), parallel=par,  # type: ignore[arg-type]
                         optimizer=OptimizerConfig())
    ddp = policy.module
    params = sum(p.numel() * p.element_size() for p in ddp.module.parameters())
    buffers = list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", []))
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    meter: dict[str, Any] = {"params": {p.untyped_storage().data_ptr() for p in ddp.parameters()}, "alive": {},
                             "now": 0, "peak": 0}
    g = torch.Generator().manual_seed(5 + state.dp_rank)
    micro = []
    for _ in range(MICRO):
        tokens = torch.randint(0, arch.vocab_size, (SEQS, S), generator=g)
        micro.append({"tokens": tokens, "targets": tokens[:, 1:].clone()})

    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return logits.float().sum() * 1e-3, {}

    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, meter), lambda held: held.t):
        actor.forward_backward(policy, micro, loss)
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"parameters": params, "gradients": grads, "activations": meter["peak"]}, f)
    parallel.destroy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

    return create_tiny_hf_checkpoint(tmp_path_factory.mktemp("plan") / "hf", seed=9, **PLAN_MOE)


@pytest.mark.parametrize("layout,recompute", [({}, ""), ({}, "full"), ({"tp": 2, "sequence_parallel": True}, ""),
                                              ({"ep": 2}, ""), ({"pp": 2}, "")],
                         ids=["one", "one-recompute", "tp2-sp", "ep2", "pp2"])
def test_the_plan_matches_the_model(hf_dir: Path, tmp_path: Path, layout: dict[str, Any], recompute: str) -> None:
    from nsr_megatron.config import read_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.memory import Layout, plan_memory

    world = 1 if not layout else 2
    run_workers(_worker, world, str(hf_dir), str(tmp_path), layout, recompute)
    measured = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    dp_share = SEQS * S  # each data-parallel rank runs its own micro-batches of this size
    plan = plan_memory(arch_from_hf(read_hf_config(hf_dir)),
                       Layout(tp=tp, pp=pp, ep=layout.get("ep", 1), etp=tp, world=world,
                              sequence_parallel=layout.get("sequence_parallel", False)),
                       params_dtype="fp32", micro_batch_tokens=dp_share, recompute=recompute,
                       te=False)
    rank = plan.stage if pp > 1 else 0  # with PP=2 on 2 ranks, rank r holds stage r
    mine = measured[rank]
    assert plan.parts["parameters"] == mine["parameters"], (plan.parts, measured)
    assert plan.parts["gradients"] == pytest.approx(mine["gradients"], rel=0.05), (plan.parts, measured)
    planned = plan.parts["activations"] + plan.parts.get("logits", 0.0)
    print(f"activations: planned {planned:.0f} B, measured {mine['activations']} B, ratio {planned / mine['activations']:.3f}")
    assert planned == pytest.approx(mine["activations"], rel=0.2), (planned, measured)


def _storages(tensors: Any) -> dict[int, int]:
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor)}


def _optimizer_bytes(optimizer: Any, model_storages: set[int]) -> tuple[int, int]:
    """(device, host) bytes of the optimizer's own tensors: Adam's state and master / host copies of the weights
    (storages of the model's parameters and buffers excluded). With megatron's hybrid-device optimizer its CPU
    sub-optimizers are the host share (on this CPU machine the "device" is the CPU too)."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    device: dict[int, int] = {}
    host: dict[int, int] = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        parts = ([(inner.gpu_optimizer, device)] if inner.gpu_optimizer is not None else []) + [
            (cpu, host) for cpu in inner.cpu_optimizers] if isinstance(inner, HybridDeviceOptimizer) else [(inner, device)]
        for sub, where in parts:
            tensors = [p for g in sub.param_groups for p in g["params"]]
            tensors += [v for st in sub.state.values() for k, v in st.items() if k != "step"]
            where.update({k: v for k, v in _storages(tensors).items() if k not in model_storages})
    return sum(device.values()), sum(host.values())


def _options_worker(rank: int, world: int, init: str, hf_dir: str, out: str, opts: dict[str, Any]) -> None:
    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.host_offload import HostOffload
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.state import train_state_tensors
    from nsr_megatron.trainer import actor

    arch = arch_from_hf(read_hf_config(hf_dir))
    parallel.initialize(ParallelConfig(), seed=3, rank=rank, world_size=world, init_method=init)
    policy = build_model(arch, model=ModelConfig(hf_path=hf_dir, fused_logprobs=opts["fused"]), parallel=ParallelConfig(),
                         optimizer=OptimizerConfig(lr=1e-4, cpu_offload=opts["offload"] > 0,
                                                   offload_fraction=opts["offload"] or 1.0,
                                                   precision_aware=opts["aware"]))
    ddp = policy.module
    buffers = list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", []))
    params = sum(p.numel() * p.element_size() for p in ddp.module.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    model_storages = set(_storages([*ddp.parameters(), *(b.grad_data for b in buffers)]))
    meter: dict[str, Any] = {"params": {p.untyped_storage().data_ptr() for p in ddp.parameters()}, "alive": {},
                             "now": 0, "peak": 0}
    g = torch.Generator().manual_seed(5)
    micro = []
    for _ in range(MICRO):
        tokens = torch.randint(0, arch.vocab_size, (SEQS, S), generator=g)
        micro.append({"tokens": tokens, "targets": tokens[:, 1:].clone()})

    def loss(output: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        lp, _ = actor._next_token_logprobs(output, batch["targets"], group=None, temperature=1.0)
        return -lp.mean(), {}

    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, meter), lambda held: held.t):
        _, grad_norm = actor.train_step(policy, micro, actor.HeadLoss(loss), lr=1e-4)
    assert grad_norm is not None
    opt_device, opt_host = _optimizer_bytes(policy.optimizer, model_storages)
    off = HostOffload("cpu")
    off.offload(train_state_tensors(ddp, policy.optimizer))
    left = sum(_storages(train_state_tensors(ddp, policy.optimizer)).values())  # what stays while engines generate
    off.onload()
    with open(os.path.join(out, "rank0.json"), "w", encoding="utf-8") as f:
        json.dump({"parameters": params, "gradients": grads, "activations": meter["peak"], "optimizer": opt_device,
                   "host_optimizer": opt_host, "left_while_generating": left}, f)
    parallel.destroy()


@pytest.mark.parametrize("opts", [
    {"offload": 0.0, "aware": False, "fused": False},
    {"offload": 1.0, "aware": False, "fused": False},
    {"offload": 0.5, "aware": False, "fused": True},
    {"offload": 1.0, "aware": True, "fused": True},
], ids=["all-off", "cpu-offload", "half-offload-fused", "offload-precision-aware-fused"])
def test_the_memory_options_match_the_plan(hf_dir: Path, tmp_path: Path, opts: dict[str, Any]) -> None:
    """Each memory option on and off: the optimizer's device and host bytes as planned, the training peak (weights,
    gradients, device optimizer state and what autograd keeps) within 10% of the plan's, and the train state that
    stays on the device while the engines generate (rollout.offload_train) as planned: nothing."""
    from nsr_megatron.config import read_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.memory import Layout, MemoryOptions, plan_memory

    run_workers(_options_worker, 1, str(hf_dir), str(tmp_path), opts)
    got = json.loads((tmp_path / "rank0.json").read_text())
    arch = arch_from_hf(read_hf_config(hf_dir))
    plans = {train_offload: plan_memory(arch, Layout(world=1), params_dtype="fp32", micro_batch_tokens=SEQS * S,
                                        te=False, colocated_fraction=0.1, gpu_bytes=1e9,
                                        options=MemoryOptions(optimizer_offload=opts["offload"],
                                                              precision_aware=opts["aware"], fused_logprobs=opts["fused"],
                                                              offload_train=train_offload))
             for train_offload in (False, True)}
    plan = plans[True]
    measured = got["parameters"] + got["gradients"] + got["optimizer"] + got["activations"]
    print(f"{opts}: planned {plan.training_peak:.0f} B, measured {measured} B, optimizer {plan.parts['optimizer']:.0f}"
          f" / {got['optimizer']}, host {plan.host_optimizer:.0f} / {got['host_optimizer']}")
    assert plan.parts["optimizer"] == pytest.approx(got["optimizer"], rel=0.1, abs=4096), (plan.parts, got)
    assert plan.host_optimizer == pytest.approx(got["host_optimizer"], rel=0.1, abs=4096), (plan.host_optimizer, got)
    assert plan.training_peak == pytest.approx(measured, rel=0.1), (plan.parts, got)
    assert got["left_while_generating"] == plan.while_generating - plan.rollout_share == 0
    assert plans[False].while_generating - plans[False].rollout_share == pytest.approx(
        got["parameters"] + got["gradients"] + got["optimizer"], rel=0.1)  # without it everything stays
