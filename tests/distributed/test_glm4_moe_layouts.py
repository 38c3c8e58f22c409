"""GLM-4-MoE under TP=2 (+ sequence parallel), EP=2 and PP=2, and from training to the rollout engine and back.

The tiny GLM-4-MoE of ``tests/unit/test_family_glm4_moe.py`` (q/k/v biases, q/k norms, partial RoPE, a dense first
layer and three MoE layers here, grouped sigmoid routing with an expert bias, shared experts):

- loaded sharded by two gloo ranks under each layout, equals a full load bitwise, converts back bit for bit, and
  gives the transformers model's logits, loss and gradients (:func:`check_layout` of the DeepSeek-V3 test);
- under TP=2 + sequence parallel, the weight export fills a randomly initialised embedded engine with exactly the
  checkpoint (the expert bias included), and the engine then generates what an engine loaded from the checkpoint
  generates, routed experts included;
- those generations, as a training batch: megatron's routers choose what the engine's chose (the profiler's
  rollout drift is 0), and with R2 replay the training pass routes as the old pass did although the routers moved
  in between (old drift 0, every real token counted, top-k experts each, entropy and margin summed); without
  replay both drifts are > 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_deepseek_v3_layouts import LAYOUTS, check_layout
from tests.spawn import run_workers
from tests.unit.test_family_glm4_moe import VOCAB, make_glm4_moe

PROMPTS = [[5, 17, 3, 44, 9], [60, 2, 31]]
NEW = 5  # tokens generated per prompt: rows of 10 and 8 tokens
MOE_LAYERS, K, EXPERTS = [1, 2, 3], 4, 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glm4_moe(tmp_path_factory.mktemp("glm4_moe") / "hf", seed=1, num_hidden_layers=4)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_load_equals_full_load_and_logits_equal_transformers(hf_dir: Path, tmp_path: Path,
                                                                     name: str) -> None:
    check_layout(hf_dir, tmp_path, LAYOUTS[name])


def _rollout_batch(generations: list[Any]) -> dict[str, torch.Tensor]:
    """The engine's rows as a training micro-batch: tokens [B, S], valid [B, S], the engine's experts
    ``rollout_topk`` [B, S, L, k] (-1 where it ran nothing: each row's last token, padding)."""
    rows = [g.prompt_ids + g.response_ids for g in generations]
    S = max(map(len, rows))
    tokens = torch.zeros(len(rows), S, dtype=torch.long)
    valid = torch.zeros(len(rows), S, dtype=torch.bool)
    topk = torch.full((len(rows), S, len(MOE_LAYERS), K), -1, dtype=torch.long)
    for i, (row, g) in enumerate(zip(rows, generations, strict=True)):
        tokens[i, : len(row)], valid[i, : len(row)] = torch.tensor(row), True
        topk[i, : len(row) - 1] = g.routed_experts.long()
    return {"tokens": tokens, "targets": tokens[:, 1:].clone(), "valid": valid, "rollout_topk": topk,
            "mb_key": torch.tensor(5)}


def _engine_worker(rank: int, world: int, init: str, hf_dir: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core.transformer.moe.router import TopKRouter
    from transformers import AutoConfig

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert.io import HFCheckpoint
    from nsr_megatron.convert.sharded import HFExport, load_hf_sharded
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.routing import RoutingProfiler, RoutingReplay
    from nsr_megatron.rollout import EmbeddedEngine
    from nsr_megatron.rollout.engine import SamplingParams
    from nsr_megatron.trainer import actor

    par = ParallelConfig(tp=2, sequence_parallel=True)
    arch = arch_from_hf(read_hf_config(hf_dir))
    parallel.initialize(par, seed=3, rank=rank, world_size=world, init_method=init)
    report: dict[str, Any] = {}
    box: list[Any] = [None]
    for mode in ("R2", "off"):
        policy = build_model(arch, model=ModelConfig(hf_path=hf_dir), parallel=par, optimizer=OptimizerConfig(),
                             routing_replay=mode == "R2")
        load_hf_sharded(policy.module, arch, hf_dir)
        if mode == "R2":  # the weight export into an engine of other (random) weights, and its generations
            export = HFExport(policy.module, arch)
            if rank == 0:
                engine = EmbeddedEngine.from_config(AutoConfig.from_pretrained(hf_dir), init_seed=11)
                report["loaded"] = engine.update_weights(export.tensors())
                ckpt = HFCheckpoint(hf_dir)
                weights = dict(engine.named_weights())
                report["different"] = [n for n in ckpt.tensors if not torch.equal(weights[n], ckpt.read(n))]
                report["tensors"] = len(ckpt.tensors)
                ckpt.close()
                params = SamplingParams(max_new_tokens=NEW, top_k=1)
                got = engine.generate(PROMPTS, params, return_routed_experts=True)
                ref = EmbeddedEngine(hf_dir).generate(PROMPTS, params, return_routed_experts=True)
                report["same_generations"] = all(
                    a[0].response_ids == b[0].response_ids and torch.equal(a[0].routed_experts, b[0].routed_experts)
                    for a, b in zip(got, ref, strict=True))
                box = [[g[0] for g in got]]
            else:
                list(export.tensors())  # rank 1 sends its shards
            dist.broadcast_object_list(box, src=0)
        micro = [_rollout_batch(box[0])]
        replay = RoutingReplay(policy.gpt, MOE_LAYERS, K, mode="R2", sequence_parallel=True) if mode == "R2" else None
        policy.replay = replay
        policy.routing = RoutingProfiler(policy.gpt, MOE_LAYERS, EXPERTS, K, full=False, sequence_parallel=True)
        actor.token_logprobs(policy, micro, temperature=1.0)  # the "old" pass
        with torch.no_grad():  # an optimizer step between the passes, the same on both ranks
            for router in (m for m in policy.gpt.modules() if isinstance(m, TopKRouter)):
                g = torch.Generator().manual_seed(100 + int(router.layer_number))
                router.weight.add_(torch.randn(router.weight.shape, generator=g) * 0.5)
        actor.zero_grads(policy)
        actor.forward_backward(policy, micro, lambda logits, batch: ((logits.float() ** 2).sum(), {}))  # "train"
        if replay is not None:
            replay.clear()
        sums = policy.routing.step_sums()
        policy.routing.remove()
        report[mode] = {k: getattr(sums, k).tolist() for k in ("drift_old", "drift_rollout", "tokens", "load",
                                                                "entropy_sum", "margin_sum")}
    if rank == 0:
        with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f)
    parallel.destroy()


def test_export_to_the_engine_generation_and_routing_replay(hf_dir: Path, tmp_path: Path) -> None:
    run_workers(_engine_worker, 2, str(hf_dir), str(tmp_path))
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["different"] == [] and r["loaded"] == r["tensors"]  # every tensor, the expert bias too
    assert r["same_generations"]
    valid = len(PROMPTS[0]) + len(PROMPTS[1]) + 2 * NEW
    known = valid - len(PROMPTS)  # the engine ran every real token but each row's last
    for layer in range(len(MOE_LAYERS)):
        assert r["R2"]["tokens"][layer] == valid and sum(r["R2"]["load"][layer]) == K * valid
        assert r["R2"]["entropy_sum"][layer] > 0 and r["R2"]["margin_sum"][layer] > 0  # the sigmoid router's terms
        assert r["R2"]["drift_old"][layer] == [0.0, valid]
        assert r["R2"]["drift_rollout"][layer] == [0.0, known]  # megatron routes as the engine did
        assert r["off"]["drift_old"][layer][0] > 0 and r["off"]["drift_rollout"][layer][0] > 0
    assert VOCAB > max(map(max, PROMPTS))
