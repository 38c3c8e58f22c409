"""Vocab-parallel log-probs and entropy under TP=2 equal the single-process full-vocabulary result.

Two gloo processes each hold half of the vocabulary (columns [rank * V/2, (rank + 1) * V/2)); the values
on every rank and each rank's gradient slice must equal full-vocab log_softmax in float64 (the ground
truth) to fp32 rounding, for logprob-only, entropy-only and combined backward passes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nsr_megatron.losses import vocab_parallel_logprobs_entropy
from tests.distributed._gloo import run

N, V = 37, 50


def reference(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def vocab_worker(rank: int, world_size: int) -> None:
    g = torch.Generator().manual_seed(7)
    full = torch.randn(N, V, generator=g) * 3.0
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:5] = 3  # all in rank 0's half for a few tokens
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    vp = V // world_size
    cols = slice(rank * vp, (rank + 1) * vp)
    group = dist.group.WORLD
    for dtype, temperature in ((torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.1)):
        logits = full.to(dtype)  # the same rounded values on every rank
        for w1, w2 in ((w_lp, w_ent), (w_lp, None), (None, w_ent)):
            shard = logits[:, cols].clone().requires_grad_()
            lp, ent = vocab_parallel_logprobs_entropy(
                shard, targets, group=group, temperature=temperature, chunk_size=8
            )
            objective = (lp * w1).sum() if w1 is not None else torch.zeros(())
            if w2 is not None:
                objective = objective + (ent * w2).sum()
            objective.backward()
            z64 = logits.double().requires_grad_()
            lp_ref, ent_ref = reference(z64, targets, temperature)
            ref_obj = (lp_ref * w1.double()).sum() if w1 is not None else torch.zeros((), dtype=torch.float64)
            if w2 is not None:
                ref_obj = ref_obj + (ent_ref * w2.double()).sum()
            ref_obj.backward()
            where = f"rank {rank} {dtype} T={temperature} lp={w1 is not None} ent={w2 is not None}"
            torch.testing.assert_close(lp.double(), lp_ref.detach(), rtol=1e-6, atol=2e-6, msg=where)
            torch.testing.assert_close(ent.double(), ent_ref.detach(), rtol=1e-6, atol=2e-6, msg=where)
            assert shard.grad is not None and shard.grad.dtype == dtype
            assert z64.grad is not None
            rtol, atol = (1e-5, 2e-6) if dtype == torch.float32 else (8e-3, 1e-5)  # bf16 gradient: 8 bits
            torch.testing.assert_close(
                shard.grad.double(), z64.grad[:, cols], rtol=rtol, atol=atol, msg=where
            )
            # every rank returns the same values
            both = [torch.empty_like(lp) for _ in range(world_size)]
            dist.all_gather(both, lp.detach().contiguous())
            assert all(torch.equal(b, lp) for b in both), where

    # a [B, S, Vp] slice as megatron's trainer passes it (logits[:, :-1]), chunks smaller than a row
    full3 = torch.randn(2, 11, V, generator=g) * 2.0
    y3 = torch.randint(0, V, (2, 10), generator=g)
    shard = full3[:, :, cols].clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs_entropy(shard[:, :-1], y3, group=group, temperature=0.9, chunk_size=4)
    (lp + 0.5 * ent).sum().backward()
    z64 = full3[:, :-1].double().requires_grad_()
    lp_ref, ent_ref = reference(z64.reshape(-1, V), y3.reshape(-1), 0.9)
    (lp_ref + 0.5 * ent_ref).sum().backward()
    torch.testing.assert_close(lp.double().reshape(-1), lp_ref.detach(), rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(ent.double().reshape(-1), ent_ref.detach(), rtol=1e-6, atol=2e-6)
    assert shard.grad is not None and z64.grad is not None
    torch.testing.assert_close(shard.grad[:, :-1].double(), z64.grad[:, :, cols], rtol=1e-5, atol=2e-6)
    assert torch.equal(shard.grad[:, -1], torch.zeros(2, vp))


def test_vocab_parallel_tp2_matches_full_vocab() -> None:
    run(vocab_worker, 2)
