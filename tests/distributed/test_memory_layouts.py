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
