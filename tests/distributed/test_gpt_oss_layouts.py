"""gpt-oss under TP=2 (+ sequence parallel), EP=2 and PP=2: sharded loading equals a full load, and the logits equal
the transformers model's.

The tiny gpt-oss of ``tests/unit/test_family_gpt_oss.py`` (four layers sliding / full / sliding / full with a window
of 3, sinks, biased router and fused biased experts, YaRN) is loaded by two gloo ranks with ``load_hf_sharded``;
every parameter then equals, bitwise, the same model filled from a full read (under TP each rank holds the sinks
of its own two heads), and the full-vocabulary logits, the next-token cross-entropy and the gradient of every
weight equal the HF model's (eager attention, fp32). The loaded model, saved with ``save_checkpoint`` under the
layout and converted back to HF, equals the original checkpoint bit for bit.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.spawn import run_workers
from tests.unit.test_convert import read_all
from tests.unit.test_family_gpt_oss import TOKENS as TOKENS9
from tests.unit.test_family_gpt_oss import VOCAB, YARN, _ce_loss, hf_loss_and_grads, make_gpt_oss

# etp=1: megatron-core supports biased experts only without expert tensor parallelism (the experts replicate over TP)
LAYOUTS = {"tp2-sp-ep2": {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}, "ep2": {"ep": 2}, "pp2": {"pp": 2}}
TOL = 1e-5
TOKENS = TOKENS9[:, :8]  # [B, S]: sequence parallelism splits S over the TP ranks; still longer than the window


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
    grads = canonical_to_hf_state(arch, canonical_state(model, grads=True))
    sharded = {n: t.detach().clone() for n, t in model.state_dict().items() if torch.is_tensor(t)}
    sinks = {n: t.tolist() for n, t in sharded.items() if n.endswith("core_attention.softmax_offset")}
    with torch.no_grad():
        for t in sharded:
            value = model.state_dict()[t]
            if value.is_floating_point():
                value.zero_()
    load_canonical_state(model, read_hf_canonical(hf_dir, arch))  # the full read, for comparison
    now = model.state_dict()
    different = [n for n, t in sharded.items() if not torch.equal(now[n], t)]
    result = {"different": different, "tensors": len(sharded), "sinks": sinks,
              "tp_rank": mpu.get_tensor_model_parallel_rank(), "pp_rank": mpu.get_pipeline_model_parallel_rank()}
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    if logits is not None and mpu.get_tensor_model_parallel_rank() == 0:
        torch.save({"logits": logits[0], "loss": float(losses[0]["loss"]), "grads": grads},
                   os.path.join(out, f"logits{rank}.pt"))
    parallel.destroy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gpt_oss(tmp_path_factory.mktemp("gpt_oss") / "hf", num_hidden_layers=4, rope_parameters=YARN,
                        layer_types=["sliding_attention", "full_attention"] * 2)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_load_equals_full_load_and_logits_equal_transformers(hf_dir: Path, tmp_path: Path,
                                                                     name: str) -> None:
    from nsr_megatron.convert import mcore_to_hf

    run_workers(_worker, 2, str(hf_dir), str(tmp_path), LAYOUTS[name])
    back = mcore_to_hf(tmp_path / "ckpt" / "step_00000001", tmp_path / "back", hf_config=hf_dir, progress=False)
    original, converted = read_all(hf_dir), read_all(back)
    assert sorted(converted) == sorted(original)
    assert all(torch.equal(converted[k], v) for k, v in original.items())
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["different"] == [], (rank, result)
        assert result["sinks"]  # every rank holds its layers' sinks
        for key, local in result["sinks"].items():  # one sink per head: this TP rank's heads
            local_layer = re.search(r"layers\.(\d+)\.", key)
            assert local_layer is not None, key
            layer = int(local_layer.group(1)) + 2 * result["pp_rank"]  # local -> global
            full = original[f"model.layers.{layer}.self_attn.sinks"]
            heads = len(local)
            assert heads == (2 if name == "tp2-sp-ep2" else 4)
            assert local == full[result["tp_rank"] * heads : (result["tp_rank"] + 1) * heads].tolist(), key
    ref, loss, ref_grads = hf_loss_and_grads(hf_dir, TOKENS)
    saved = sorted(tmp_path.glob("logits*.pt"))
    assert saved
    for path in saved:
        got = torch.load(path)
        assert got["logits"].shape == (*TOKENS.shape, VOCAB)
        torch.testing.assert_close(got["logits"], ref, atol=TOL, rtol=0)
        assert got["loss"] == pytest.approx(float(loss), abs=1e-6)
        off = {n: float((got["grads"][n] - g).abs().max()) for n, g in ref_grads.items()
               if not torch.allclose(got["grads"][n], g, atol=TOL, rtol=1e-4)}
        assert off == {}, off  # name -> largest absolute difference
