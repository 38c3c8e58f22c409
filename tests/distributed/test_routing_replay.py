"""Routing replay (``algorithm.routing_replay``) on real megatron-core models, in one process and under
TP=2 + sequence parallel, EP=2 and PP=2, with two micro-batches.

The batch goes through an old-log-prob pass, a change of the router weights (as an optimizer step would), and a
training pass; the routing profiler reports what the training forward chose.

- R2: the training forward routes exactly as the old pass did (drift 0), although the routers moved, and the
  routers still receive gradients.
- R3: the training forward routes exactly as the "engine" did: a hand-made table of expert choices unrelated to
  the model's own, with unknown (-1) entries at each row's last token, which take the old pass's choice.
- Without replay the same passes drift from both: the checks above could fail.
- With full activation recompute, the replayed routing also holds in the backward's recomputation: the gradients
  equal those without recompute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_routing_profiler import ROWS, S, _batch, decisive_moe_checkpoint
from tests.spawn import run_workers

LAYERS, K, EXPERTS = 2, 2, 4


def _engine_table(valid: torch.Tensor) -> torch.Tensor:
    """The "engine's" choices [ROWS, S, LAYERS, K]: random distinct experts; -1 on each row's last real token
    (the engine never runs it) and on padding."""
    g = torch.Generator().manual_seed(21)
    table = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(ROWS * S * LAYERS)])
    table = table.view(ROWS, S, LAYERS, K).clone()
    for i in range(ROWS):
        last = int(valid[i].sum()) - 1
        table[i, last:] = -1
    return table


def _micro_batches(rank_rows: slice) -> list[dict[str, torch.Tensor]]:
    full = _batch()[0]
    full["rollout_topk"] = _engine_table(full["valid"])
    mine = {k: v[rank_rows] for k, v in full.items()}
    half = mine["tokens"].shape[0] // 2
    return [{k: v[part] for k, v in mine.items()} | {"mb_key": torch.tensor(key)}
            for key, part in ((3, slice(0, half)), (4, slice(half, None)))]


def _worker(rank: int, world: int, init: str, hf_dir: str, out: str, layout: dict[str, Any],
            cases: list[tuple[str, str]]) -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert.sharded import load_hf_sharded
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.routing import RoutingProfiler, RoutingReplay
    from nsr_megatron.trainer import actor

    par = ParallelConfig(**layout)
    arch = arch_from_hf(read_hf_config(hf_dir))
    state = parallel.initialize(par, seed=3, rank=rank, world_size=world, init_method=init)
    results: dict[str, Any] = {}
    for mode, recompute in cases:
        policy = build_model(arch, model=ModelConfig(hf_path=hf_dir, recompute=recompute), parallel=par,  # type: ignore[arg-type]
                             optimizer=OptimizerConfig(), routing_replay=mode != "off")
        load_hf_sharded(policy.module, arch, hf_dir)
        if mode != "off":
            policy.replay = RoutingReplay(policy.gpt, [0, 1], K, mode=mode, sequence_parallel=par.sequence_parallel)
        policy.routing = RoutingProfiler(policy.gpt, [0, 1], EXPERTS, K, full=False,
                                         sequence_parallel=par.sequence_parallel)
        micro = _micro_batches(slice(state.dp_rank, None, state.dp_size))
        actor.token_logprobs(policy, micro, temperature=1.0)  # the "old" pass
        routers = [m for m in policy.gpt.modules() if isinstance(m, TopKRouter)]
        with torch.no_grad():  # the optimizer step between the passes, the same change on every layout
            for router in routers:
                g = torch.Generator().manual_seed(100 + int(router.layer_number))
                router.weight.add_(torch.randn(router.weight.shape, generator=g) * 0.5)

        def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
            return (logits.float() ** 2).sum(), {}

        actor.zero_grads(policy)
        actor.forward_backward(policy, micro, loss)  # the "train" pass
        grads = {str(int(r.layer_number)): r.weight.main_grad.detach().clone() for r in routers}
        if policy.replay is not None:
            policy.replay.clear()
        sums = policy.routing.step_sums()
        policy.routing.remove()
        name = f"{mode}{'-' + recompute if recompute else ''}"
        results[name] = {"drift_old": sums.drift_old.tolist(), "drift_rollout": sums.drift_rollout.tolist(),
                         "tokens": sums.tokens.tolist(),
                         "grad_norm": {k: float(v.norm()) for k, v in grads.items()},
                         "grads": {k: v.tolist() for k, v in grads.items()}}
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    parallel.destroy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return decisive_moe_checkpoint(tmp_path_factory.mktemp("replay") / "hf")


def _valid_and_known() -> tuple[int, int]:
    valid = _batch()[0]["valid"]
    return int(valid.sum()), int(valid.sum()) - ROWS  # the engine knows every real token but each row's last


def _check(results: dict[str, Any]) -> None:
    valid, known = _valid_and_known()
    for layer in range(LAYERS):
        assert results["R2"]["drift_old"][layer] == [0.0, valid]
        assert results["R3"]["drift_rollout"][layer] == [0.0, known]
        assert results["R2"]["tokens"][layer] == results["R3"]["tokens"][layer] == valid
        # without replay, the moved routers differ from the old pass and the random table differs from both
        assert 0 < results["off"]["drift_old"][layer][0] < valid
        assert results["off"]["drift_rollout"][layer][0] > known / 4


def _merge(out: Path, world: int) -> dict[str, Any]:
    """Rank 0's sums (already reduced over ranks) with every rank's router gradient norms."""
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    merged = ranks[0]
    for case in merged:
        merged[case]["grad_norm"] = {k: v for r in ranks for k, v in r[case]["grad_norm"].items()}
    return merged


def test_replay_in_one_process_and_under_recompute(hf_dir: Path, tmp_path: Path) -> None:
    run_workers(_worker, 1, str(hf_dir), str(tmp_path), {},
                [("off", ""), ("R2", ""), ("R3", ""), ("R3", "full")])
    results = _merge(tmp_path, 1)
    _check(results)
    for mode in ("R2", "R3"):
        assert set(results[mode]["grad_norm"]) == {"1", "2"}
        assert all(norm > 0 for norm in results[mode]["grad_norm"].values()), "the routers got no gradient"
    # The recomputed forward in the backward routes by the replayed table too: the same gradients.
    for layer, grad in results["R3"]["grads"].items():
        torch.testing.assert_close(torch.tensor(results["R3-full"]["grads"][layer]), torch.tensor(grad),
                                   rtol=1e-5, atol=1e-6 * float(torch.tensor(grad).abs().max()))
    assert results["R3-full"]["drift_rollout"] == results["R3"]["drift_rollout"]


@pytest.mark.parametrize("layout", [{"tp": 2, "sequence_parallel": True}, {"ep": 2}, {"pp": 2}],
                         ids=["tp2-sp", "ep2", "pp2"])
def test_replay_under_every_layout(hf_dir: Path, tmp_path: Path, layout: dict[str, Any]) -> None:
    run_workers(_worker, 2, str(hf_dir), str(tmp_path), layout, [("off", ""), ("R2", ""), ("R3", "")])
    results = _merge(tmp_path, 2)
    _check(results)
    for mode in ("R2", "R3"):
        assert set(results[mode]["grad_norm"]) == {"1", "2"}  # both layers' routers, wherever they live
        assert all(norm > 0 for norm in results[mode]["grad_norm"].values()), "the routers got no gradient"
