"""The same weights give the same logits, gradients and optimizer behaviour under every layout.

A tiny Qwen3-MoE policy is built once (TP=1, DP=2), saved as a dist checkpoint, then loaded under
TP=2 + sequence parallel, EP=2 and PP=2 (2 gloo processes each). Every layout must reproduce the
reference's full-vocabulary logits and its gradients of a fixed loss (gathered to the canonical,
layout-free view) to 1e-5 relative in fp32, and one distributed-optimizer step must change every
parameter and lower the loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.spawn import run_workers

SEED = 7
BATCH = {"B": 2, "S": 8}
REFERENCE = {"tp": 1}
LAYOUTS = {
    "tp2-sp": {"tp": 2, "sequence_parallel": True},
    "ep2": {"ep": 2},
    "pp2": {"pp": 2},
}


def tiny_moe_config(path: Path) -> Path:
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    cfg.save_pretrained(path)
    return path


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, 64, (BATCH["B"], BATCH["S"]), generator=g)
    targets = torch.randint(0, 64, (BATCH["B"], BATCH["S"]), generator=g)
    return tokens, targets


def _ce_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ce = vocab_parallel_cross_entropy(logits.float(), batch["targets"])  # [B, S]
    loss = ce.mean()
    return loss, {"loss": loss.detach()}


def _layout_worker(rank: int, world: int, init: str, hf_dir: str, ckpt: str, out: str, layout: dict[str, Any]) -> None:
    from megatron.core import parallel_state as mpu

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf, validate_layout
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.state import canonical_state
    from nsr_megatron.trainer import actor
    from nsr_megatron.trainer.checkpoint import load_checkpoint, save_checkpoint

    par = ParallelConfig(**layout)
    model_cfg = ModelConfig(hf_path=hf_dir, transformer_impl="local")
    arch = arch_from_hf(read_hf_config(hf_dir))
    validate_layout(arch, model_cfg, par, world)
    parallel.initialize(par, seed=SEED, rank=rank, world_size=world, init_method=init)
    policy = build_model(arch, model=model_cfg, parallel=par, optimizer=OptimizerConfig(lr=1e-2))
    is_reference = layout == REFERENCE
    if is_reference:  # the optimizer has no state before its first step: weights only
        save_checkpoint(ckpt, 0, policy.module)
    else:
        load_checkpoint(Path(ckpt) / "step_00000000", policy.module)

    tokens, targets = _batch()
    micro = [{"tokens": tokens, "targets": targets}]
    logits = actor.forward_logits(policy, micro)

    actor.zero_grads(policy)
    losses = actor.forward_backward(policy, micro, _ce_loss)
    grads = canonical_state(policy.module, grads=True)
    params_before = canonical_state(policy.module)
    actor.optimizer_step(policy)
    params_after = canonical_state(policy.module)
    actor.zero_grads(policy)
    losses_after = actor.forward_backward(policy, micro, _ce_loss, forward_only=True)

    # Optimizer state reshards too: the reference saves weights + Adam state after its step; every
    # layout resumes from that checkpoint and must take the same second step.
    if is_reference:
        save_checkpoint(ckpt, 1, policy.module, policy.optimizer)
    else:
        load_checkpoint(Path(ckpt) / "step_00000001", policy.module, policy.optimizer)
    actor.zero_grads(policy)
    actor.forward_backward(policy, micro, _ce_loss)
    actor.optimizer_step(policy)
    params_second = canonical_state(policy.module)

    if rank == 0 or mpu.is_pipeline_last_stage() and mpu.get_tensor_model_parallel_rank() == 0:
        result: dict[str, Any] = {
            "grads": grads,
            "before": params_before,
            "after": params_after,
            "second": params_second,
        }
        if logits is not None:
            result.update(
                logits=logits[0],
                loss=float(losses[0]["loss"]),
                loss_after=float(losses_after[0]["loss"]),
            )
        name = "last" if logits is not None else "first"
        torch.save(result, os.path.join(out, f"{name}.pt"))
    parallel.destroy()


def _run_layout(tmp: Path, hf_dir: Path, ckpt: Path, name: str, layout: dict[str, Any]) -> dict[str, Any]:
    out = tmp / name
    out.mkdir()
    run_workers(_layout_worker, 2, str(hf_dir), str(ckpt), str(out), layout)
    return torch.load(out / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("layouts")
    hf_dir = tiny_moe_config(tmp / "hf")
    ckpt = tmp / "ckpt"
    return hf_dir, ckpt, _run_layout(tmp, hf_dir, ckpt, "reference", REFERENCE)


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    scale = float(expected.abs().max()) or 1.0
    err = float((actual - expected).abs().max())
    assert err <= rel * scale, f"{what}: max abs diff {err:.3e} > {rel} x max |ref| {scale:.3e}"


def test_reference_step_changes_every_parameter_and_lowers_loss(reference: Any) -> None:
    _, _, ref = reference
    for key, before in ref["before"].items():
        assert not torch.equal(before, ref["after"][key]), f"{key} did not change in the optimizer step"
        assert ref["grads"][key].abs().sum() > 0, f"{key} has an all-zero gradient"
    assert ref["loss_after"] < ref["loss"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_reference(reference: Any, tmp_path: Path, name: str) -> None:
    hf_dir, ckpt, ref = reference
    got = _run_layout(tmp_path, hf_dir, ckpt, name, LAYOUTS[name])

    assert got["logits"].shape == ref["logits"].shape == (BATCH["B"], BATCH["S"], 64)
    _assert_close_rel(got["logits"], ref["logits"], f"{name} logits")
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])

    assert sorted(got["grads"]) == sorted(ref["grads"])
    for key, g in ref["grads"].items():
        _assert_close_rel(got["grads"][key], g, f"{name} grad {key}")
    for key, before in got["before"].items():
        _assert_close_rel(before, ref["before"][key], f"{name} loaded weight {key}", rel=0.0)
        assert not torch.equal(before, got["after"][key]), f"{name}: {key} did not change in the optimizer step"
    assert got["loss_after"] < got["loss"], f"{name}: loss {got['loss']} -> {got['loss_after']} did not drop"
    for key, ref_second in ref["second"].items():
        _assert_close_rel(got["second"][key], ref_second, f"{name} step after resharded resume {key}", rel=1e-4)
