"""The routing profiler counts the same under every layout as in one process.

The same tiny Qwen3-MoE (router weights scaled so that no token sits on a near-tie) and the same batch of 4 rows
go through an old-log-prob pass, a change of the router weights, and a training pass, in one process and under
TP=2 + sequence parallel, EP=2 (data parallel: each rank gets half the rows) and PP=2. Hand-made per-token masks
stand for the loss's band / clipped / rescued tokens. Expert load, token counts, drift and the per-expert mask
counts must be equal; entropy and margin sums equal to rounding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.spawn import run_workers

MOE = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=32,
           intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
ROWS, S = 4, 12


def _batch() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 64, (ROWS, S), generator=g)
    valid = torch.ones(ROWS, S, dtype=torch.bool)
    valid[1, 9:] = False  # padding is not routed
    valid[3, 5:] = False
    return [{"tokens": tokens, "targets": tokens[:, 1:].clone(), "valid": valid}]


def _masks() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    return {name: torch.rand(ROWS, S - 1, generator=g) < p for name, p in (("band", 0.3), ("clipped", 0.5),
                                                                           ("rescued", 0.2))}


def _worker(rank: int, world: int, init: str, hf_dir: str, out: str, layout: dict[str, Any]) -> None:
    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert.sharded import load_hf_sharded
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.routing import RoutingProfiler
    from nsr_megatron.trainer import actor

    par = ParallelConfig(**layout)
    arch = arch_from_hf(read_hf_config(hf_dir))
    state = parallel.initialize(par, seed=3, rank=rank, world_size=world, init_method=init)
    policy = build_model(arch, model=ModelConfig(hf_path=hf_dir), parallel=par, optimizer=OptimizerConfig())
    load_hf_sharded(policy.module, arch, hf_dir)
    policy.routing = RoutingProfiler(policy.gpt, [0, 1], arch.num_experts, arch.moe_topk, full=True,
                                     sequence_parallel=par.sequence_parallel)
    full = _batch()[0]
    mine = slice(state.dp_rank, None, state.dp_size)  # data-parallel ranks split the rows
    micro = [{k: v[mine] for k, v in full.items()} | {"mb_key": torch.tensor(7)}]
    actor.token_logprobs(policy, micro, temperature=1.0)  # the "old" pass
    from megatron.core.transformer.moe.router import TopKRouter

    with torch.no_grad():  # the optimizer step between the passes, as the same change on every layout
        for router in (m for m in policy.gpt.modules() if isinstance(m, TopKRouter)):
            g = torch.Generator().manual_seed(100 + int(router.layer_number))  # the global layer
            router.weight.add_(torch.randn(router.weight.shape, generator=g) * 0.5)

    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return logits.float().sum() * 0.0, {}

    actor.zero_grads(policy)
    actor.forward_backward(policy, micro, loss)  # the "train" pass
    masks = {k: v[mine] for k, v in _masks().items()}
    policy.routing.attribute({7: masks}, {7: tuple(micro[0]["tokens"].shape)})
    sums = policy.routing.step_sums()
    if rank == 0:
        with open(os.path.join(out, "sums.json"), "w", encoding="utf-8") as f:
            json.dump({k: getattr(sums, k).tolist() for k in sums.__dataclass_fields__}, f)
    parallel.destroy()


def decisive_moe_checkpoint(path: Path) -> Path:
    """The tiny MoE with its router weights scaled up: decisive routing, no near-ties for rounding to flip."""
    from safetensors.torch import load_file, save_file

    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

    hf_dir = create_tiny_hf_checkpoint(path, seed=9, **MOE)
    weights = load_file(hf_dir / "model.safetensors")
    for name in weights:
        if name.endswith("mlp.gate.weight"):
            weights[name] = weights[name] * 40.0
    save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    return hf_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("routing")
    hf_dir = decisive_moe_checkpoint(root / "hf")
    out = root / "single"
    out.mkdir()
    run_workers(_worker, 1, str(hf_dir), str(out), {})
    return hf_dir, json.loads((out / "sums.json").read_text())


def test_the_single_process_counts_are_not_trivial(reference: tuple[Path, dict[str, Any]]) -> None:
    _, ref = reference
    valid = 2 * S + 9 + 5  # real tokens of the 4 rows
    assert ref["tokens"] == [valid, valid]
    assert [sum(row) for row in ref["load"]] == [2 * valid, 2 * valid]  # top-2
    assert all(0 < changed < compared for changed, compared in ref["drift_old"])  # the router change moved some
    assert all(sum(row) > 0 for key in ("band", "clipped", "rescued") for row in ref[key])


@pytest.mark.parametrize("layout", [{"tp": 2, "sequence_parallel": True}, {"ep": 2}, {"pp": 2}],
                         ids=["tp2-sp", "ep2", "pp2"])
def test_every_layout_counts_like_one_process(reference: tuple[Path, dict[str, Any]], tmp_path: Path,
                                              layout: dict[str, Any]) -> None:
    hf_dir, ref = reference
    run_workers(_worker, 2, str(hf_dir), str(tmp_path), layout)
    got = json.loads((tmp_path / "sums.json").read_text())
    for key in ("load", "tokens", "drift_old", "band", "clipped", "rescued"):
        assert got[key] == ref[key], key
    for key in ("entropy_sum", "margin_sum"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), key
