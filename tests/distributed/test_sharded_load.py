"""Sharded loading reads only what a rank owns, and loads exactly what a full load loads.

Two gloo ranks build a tiny model under TP=2 (+ sequence parallel), EP=2 and PP=2 and fill it with
``load_hf_sharded`` from an HF checkpoint. The reader counts the bytes it reads: on an MoE model whose expert
weights dominate, no rank reads more than 0.6 of the model's bytes (replicated tensors, such as attention under
EP, are read whole). Every parameter then equals, bitwise, the same model filled from a full read of the checkpoint.
A dense Qwen2 with qkv bias and tied embeddings checks the stacked-layer, bias and tied-head paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.spawn import run_workers

MOE = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=64,
           intermediate_size=128, moe_intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64)
DENSE = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=64, hidden_size=32,
             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=True, max_position_embeddings=64)
LAYOUTS = {"tp2-sp": {"tp": 2, "sequence_parallel": True}, "ep2": {"ep": 2}, "pp2": {"pp": 2}}


def _worker(rank: int, world: int, init: str, hf_dir: str, out: str, layout: dict[str, Any]) -> None:
    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert.sharded import load_hf_sharded, read_hf_canonical
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.state import load_canonical_state

    par = ParallelConfig(**layout)
    arch = arch_from_hf(read_hf_config(hf_dir))
    parallel.initialize(par, seed=3, rank=rank, world_size=world, init_method=init)
    model = build_model(arch, model=ModelConfig(hf_path=hf_dir), parallel=par, role="reference").module
    stats = load_hf_sharded(model, arch, hf_dir)
    sharded = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_canonical_state(model, read_hf_canonical(hf_dir, arch))  # the full read, for comparison
    different = [n for n, p in model.named_parameters() if not torch.equal(p, sharded[n])]
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"bytes_read": stats["bytes_read"], "different": different, "params": len(sharded)}, f)
    parallel.destroy()


def _model_bytes(hf_dir: Path) -> int:
    from nsr_megatron.convert.io import HFCheckpoint

    ckpt = HFCheckpoint(hf_dir)
    try:
        return sum(t.nbytes for t in ckpt.tensors.values())
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("sharded")
    return {"moe": create_tiny_hf_checkpoint(root / "moe", seed=5, **MOE),
            "dense": create_tiny_hf_checkpoint(root / "dense", seed=6, **DENSE)}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_rank_reads_only_its_slices_and_loads_exactly(models: dict[str, Path], tmp_path: Path,
                                                           name: str) -> None:
    run_workers(_worker, 2, str(models["moe"]), str(tmp_path), LAYOUTS[name])
    total = _model_bytes(models["moe"])
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["params"] > 0 and got["different"] == [], got["different"]
        share = got["bytes_read"] / total
        assert 0.3 < share <= 0.6, f"{name} rank {rank} read {share:.2f} of the model bytes"


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_dense_qkv_bias_and_tied_embeddings(models: dict[str, Path], tmp_path: Path, layout: dict[str, Any]) -> None:
    run_workers(_worker, 2, str(models["dense"]), str(tmp_path), layout)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["params"] > 0 and got["different"] == [], got["different"]
