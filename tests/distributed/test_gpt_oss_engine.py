"""gpt-oss and the rollout side: weight export into the embedded engine, generation, routing profiler and replay.

- Every rank of an EP=2 megatron model writes its shards (the fused experts included: whole experts per rank, the
  gate / up halves interleaved back) into the embedded engine's shared-memory weights; the engine then holds the
  checkpoint bit for bit. Under TP=2 + SP (expert TP 1) the gathered export equals the checkpoint too.
- The engine generates with sliding-window layers and sinks: greedy continuations of prompts of different lengths
  (left padding) equal transformers' own ``generate``, and it reports each token's experts.
- Routing replay on gpt-oss's biased router: R2 routes the training forward exactly as the old pass (drift 0)
  although the routers moved; R3 follows the engine's table; without replay both drift.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.test_routing_replay import _check, _merge
from tests.distributed.test_routing_replay import _worker as _replay_worker
from tests.distributed.test_weight_export import _roundtrip_worker, _shared_worker
from tests.spawn import run_workers
from tests.unit.test_family_gpt_oss import make_gpt_oss

# the routing tests' batch: vocabulary 64, 2 MoE layers, 4 experts, top-2
SMALL = dict(vocab_size=64, num_hidden_layers=2, num_local_experts=4, layer_types=["sliding_attention",
                                                                                   "full_attention"])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny gpt-oss with decisive routing (router weights scaled up: no near-ties for rounding to flip)."""
    from safetensors.torch import load_file, save_file

    path = make_gpt_oss(tmp_path_factory.mktemp("gpt_oss_engine") / "hf", seed=4, **SMALL)
    weights = load_file(path / "model.safetensors")
    for name in weights:
        if name.endswith("mlp.router.weight"):
            weights[name] = weights[name] * 10.0
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_every_ep_rank_writes_its_experts_into_the_engines_shared_memory(hf_dir: Path, tmp_path: Path) -> None:
    run_workers(_shared_worker, 2, str(hf_dir), str(tmp_path), {"ep": 2}, "float32")
    report = json.loads((tmp_path / "shared0.json").read_text())
    assert "model.layers.1.mlp.experts.gate_up_proj" in report["names"]
    assert report["different"] == []


def test_the_export_under_tp_equals_the_checkpoint(hf_dir: Path, tmp_path: Path) -> None:
    run_workers(_roundtrip_worker, 2, str(hf_dir), str(tmp_path), {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True})
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert sorted(report["names"]) == report["expected"] and report["different"] == []


def test_the_engine_generates_as_transformers(hf_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from nsr_megatron.rollout import EmbeddedEngine
    from nsr_megatron.rollout.engine import SamplingParams

    engine = EmbeddedEngine(hf_dir)
    prompts = [[5, 9, 3, 7, 1, 2], [11, 4]]  # left-padded to the longer one: the window meets the padding
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6, top_k=1), return_routed_experts=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for prompt, (gen,) in zip(prompts, out, strict=True):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert gen.response_ids == ref[0, len(prompt):].tolist()
        assert gen.routed_experts is not None
        assert tuple(torch.as_tensor(gen.routed_experts).shape) == (len(prompt) + 6 - 1, 2, 2)  # [P + R - 1, L, k]


def test_routing_replay_gives_zero_drift(hf_dir: Path, tmp_path: Path) -> None:
    run_workers(_replay_worker, 1, str(hf_dir), str(tmp_path), {}, [("off", ""), ("R2", ""), ("R3", "")])
    results = _merge(tmp_path, 1)
    _check(results)  # R2: drift 0 from the old pass; R3: drift 0 from the engine; off: both drift
    assert all(norm > 0 for norm in results["R2"]["grad_norm"].values()), "the routers got no gradient"
