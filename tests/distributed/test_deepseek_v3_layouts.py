"""DeepSeek-V3 under TP=2 (+ sequence parallel), EP=2 and PP=2: sharded loading equals a full load, and the
logits equal the transformers model's.

The tiny DeepSeek-V3 of ``tests/unit/test_family_deepseek_v3.py`` (MLA with a query latent, a dense first layer and
three MoE layers here,
grouped sigmoid routing with an expert bias, shared experts) is loaded by two gloo ranks with ``load_hf_sharded``;
every parameter and buffer (the router's expert bias) then equals, bitwise, the same model filled from a full read,
and the full-vocabulary logits, the next-token cross-entropy and the gradient of every weight equal the HF model's
(eager attention, fp32). The loaded model, saved with ``save_checkpoint`` under the layout and converted back to HF,
equals the original checkpoint bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.spawn import run_workers
from tests.unit.test_convert import read_all
from tests.unit.test_family_deepseek_v3 import TOKENS as TOKENS9
from tests.unit.test_family_deepseek_v3 import VOCAB, _ce_loss, hf_grads, make_deepseek_v3

LAYOUTS = {"tp2-sp": {"tp": 2, "sequence_parallel": True}, "ep2": {"ep": 2}, "pp2": {"pp": 2}}
TOL = 1e-5
TOKENS = TOKENS9[:, :8]  # [B, S]: sequence parallelism splits S over the TP ranks


def _worker(rank: int, world: int, init: str, hf_dir: str, out: str, layout: dict[str, Any]) -> None:
    from megatron.core import parallel_state as mpu

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert.mapping import canonical_to_hf_state
    from nsr_megatron.convert.sharded import load_hf_sharded, read_hf_canonical
    from nsr_megatron.models.hf_config import arch_from_hf, validate_layout
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.state import canonical_state, load_canonical_state
    from nsr_megatron.trainer import actor
    from nsr_megatron.trainer.checkpoint import save_checkpoint

    par = ParallelConfig(**layout)
    model_cfg = ModelConfig(hf_path=hf_dir, transformer_impl="local")
    arch = arch_from_hf(read_hf_config(hf_dir))
    validate_layout(arch, model_cfg, par, world)
    parallel.initialize(par, seed=3, rank=rank, world_size=world, init_method=init)
    bundle = build_model(arch, model=model_cfg, parallel=par, optimizer=OptimizerConfig(lr=1e-3))
    model = bundle.module
    load_hf_sharded(model, arch, hf_dir)
    save_checkpoint(os.path.join(out, "ckpt"), 1, model)
    micro = [{"tokens": TOKENS, "targets": TOKENS.roll(-1, dims=1)}]
    logits = actor.forward_logits(bundle, micro)
    actor.zero_grads(bundle)
    losses = actor.forward_backward(bundle, micro, _ce_loss)
    canonical_grads = canonical_state(model, grads=True)
    weights = canonical_state(model)
    for key in weights:  # buffers (the expert bias) have no gradient
        canonical_grads.setdefault(key, torch.zeros_like(weights[key]))
    grads = canonical_to_hf_state(arch, canonical_grads)
    sharded = {n: t.detach().clone() for n, t in model.state_dict().items() if torch.is_tensor(t)}
    with torch.no_grad():
        for t in sharded:
            value = model.state_dict()[t]
            if value.is_floating_point():
                value.zero_()
    load_canonical_state(model, read_hf_canonical(hf_dir, arch))  # the full read, for comparison
    now = model.state_dict()
    different = [n for n, t in sharded.items() if not torch.equal(now[n], t)]
    bias = [n for n in sharded if n.endswith("router.expert_bias")]
    result = {"different": different, "biases": len(bias), "tensors": len(sharded)}
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    if logits is not None and mpu.get_tensor_model_parallel_rank() == 0:
        torch.save({"logits": logits[0], "loss": float(losses[0]["loss"]), "grads": grads},
                   os.path.join(out, f"logits{rank}.pt"))
    parallel.destroy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_deepseek_v3(tmp_path_factory.mktemp("deepseek_v3") / "hf", q_lora_rank=16, num_hidden_layers=4)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_load_equals_full_load_and_logits_equal_transformers(hf_dir: Path, tmp_path: Path,
                                                                     name: str) -> None:
    check_layout(hf_dir, tmp_path, LAYOUTS[name])


def check_layout(hf_dir: Path, tmp_path: Path, layout: dict[str, Any]) -> None:
    """Two ranks under ``layout`` load the MoE checkpoint ``hf_dir`` (vocabulary ``VOCAB``, layers 1 and up MoE
    with an expert bias) sharded: equal to a full load, saved and converted back bit for bit, and the logits, loss
    and gradients of ``TOKENS`` equal the transformers model's."""
    from transformers import AutoModelForCausalLM

    from nsr_megatron.convert import mcore_to_hf

    run_workers(_worker, 2, str(hf_dir), str(tmp_path), layout)
    back = mcore_to_hf(tmp_path / "ckpt" / "step_00000001", tmp_path / "back", hf_config=hf_dir, progress=False)
    original, converted = read_all(hf_dir), read_all(back)
    assert sorted(converted) == sorted(original)
    assert all(torch.equal(converted[k], v) for k, v in original.items())
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["different"] == [], (rank, result)
        assert result["biases"] > 0  # the expert bias is a buffer this rank holds and loaded
    ref_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    ref = ref_model(TOKENS).logits  # [B, S, V]
    loss = torch.nn.functional.cross_entropy(ref.reshape(-1, VOCAB), TOKENS.roll(-1, dims=1).reshape(-1))
    loss.backward()
    ref_grads = hf_grads(ref_model)
    saved = sorted(tmp_path.glob("logits*.pt"))
    assert saved
    for path in saved:
        got = torch.load(path)
        assert got["logits"].shape == (*TOKENS.shape, VOCAB)
        torch.testing.assert_close(got["logits"], ref.detach(), atol=TOL, rtol=0)
        assert got["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
        off = {name: float((got["grads"][name] - g).abs().max()) for name, g in ref_grads.items()
               if not torch.allclose(got["grads"][name], g, atol=TOL, rtol=1e-4)}
        assert off == {}, off  # name -> largest absolute difference
