"""Fused log-probs under tensor parallelism (2 gloo processes):

(a) the op with the vocabulary split over two ranks equals the single-process result: the same values on every
    rank, each rank's slice of the weight gradient, and the hidden-state gradient once the ranks' partial sums
    are added (what megatron's mapping does);
(b) a real megatron GPTModel under TP=2 with sequence parallelism (untied and tied embeddings) and under TP=2
    without it (the all-reduce path): ``actor.token_logprobs`` and ``actor.policy_loss_fn`` with
    ``fused_logprobs`` on give the log-probs and the DDP ``main_grad`` buffers of the logits path, at
    temperature 0.7 (the fused op adds the output weight's gradient to ``main_grad`` itself; with tied embeddings
    the embedding's own gradient still arrives through DDP's hook); a plain loss function still gets logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.spawn import run_workers

N, H, V = 29, 16, 64


def _op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor],
        group: Any, dtype: torch.dtype, temperature: float, tiles: tuple[int | None, int | None]) -> tuple[torch.Tensor, ...]:
    """(logprob, entropy, d/dhidden, d/dweight) of sum(w_lp * logprob + w_ent * entropy)."""
    from nsr_megatron.losses import fused_logprobs_entropy

    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    lp, ent = fused_logprobs_entropy(h, w, targets, group=group, temperature=temperature, chunk_size=tiles[0],
                                     vocab_chunk_size=tiles[1])
    (lp * weights[0] + ent * weights[1]).sum().backward()
    assert h.grad is not None and w.grad is not None
    return lp.detach(), ent.detach(), h.grad, w.grad


def check_op(rank: int, world_size: int) -> None:
    """(a): the op alone, the vocabulary split over the world."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, H, generator=g)  # [N, H] the same on every rank
    weight = torch.randn(V, H, generator=g)  # [V, H] logits of std ~4
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:4] = 5  # all in rank 0's half for a few tokens
    weights = torch.randn(N, generator=g), torch.randn(N, generator=g)
    vp = V // world_size
    rows = slice(rank * vp, (rank + 1) * vp)
    tilings: list[tuple[torch.dtype, float, tuple[int | None, int | None]]] = [(torch.float32, 0.7, (7, 9)), (torch.float32, 1.0, (None, None)),
                                                                             (torch.bfloat16, 0.7, (None, None))]
    for dtype, temperature, tiles in tilings:
        setting = (dtype, temperature, tiles)
        lp, ent, grad_h, grad_w = _op(hidden, weight[rows], targets, weights, dist.group.WORLD, *setting)
        ref = _op(hidden, weight, targets, weights, None, *setting)
        where = f"rank {rank} {dtype} T={temperature} tiles={tiles}"
        torch.testing.assert_close(lp, ref[0], rtol=1e-6, atol=2e-6, msg=where)
        torch.testing.assert_close(ent, ref[1], rtol=1e-6, atol=2e-6, msg=where)
        total_h = grad_h.float()
        dist.all_reduce(total_h)  # the partial sums of the two vocabulary halves
        if dtype == torch.float32:
            torch.testing.assert_close(total_h, ref[2], rtol=1e-5, atol=2e-6 * float(ref[2].abs().max()), msg=where)
            torch.testing.assert_close(grad_w, ref[3][rows], rtol=1e-5, atol=2e-6 * float(ref[3].abs().max()),
                                       msg=where)
        else:  # one tile per rank and in one process: the GEMMs round alike, except the halves' sum of d/dh
            assert torch.equal(grad_w, ref[3][rows]), where
            torch.testing.assert_close(total_h, ref[2].float(), rtol=8e-3, atol=8e-3 * float(ref[2].abs().max()),
                                       msg=where)
        both = [torch.empty_like(lp) for _ in range(world_size)]
        dist.all_gather(both, lp)
        assert all(torch.equal(b, lp) for b in both), where


MOE: dict[str, Any] = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
           max_position_embeddings=64)
DENSE = {**MOE, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # name: (HF config overrides, parallel layout)
    "tp2-sp": (MOE, {"tp": 2, "sequence_parallel": True}),
    "tp2-sp-tied": ({**MOE, "tie_word_embeddings": True}, {"tp": 2, "sequence_parallel": True}),
    "tp2-dense": (DENSE, {"tp": 2, "sequence_parallel": False}),  # the all-reduce path of the output layer
}
ROWS, S, TEMPERATURE = 3, 12, 0.7


def _micro(vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (ROWS, S), generator=g)
    mask = torch.ones(ROWS, S - 1)
    mask[0, :4] = 0.0  # a prompt
    return [{"tokens": tokens, "targets": tokens[:, 1:].clone(), "mask": mask,
             "token_index": torch.arange(S - 1).expand(ROWS, -1).clone(), "advantages": torch.randn(ROWS, generator=g),
             "sample_ids": torch.arange(ROWS), "rollout_logprobs": torch.zeros(ROWS, S - 1)}]


def _compare_paths(name: str, hf_dir: str, layout: dict[str, Any]) -> None:
    """(b) on one model: the logits path, then the fused path, on the same weights and micro-batch."""
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.losses import PolicyLossConfig
    from nsr_megatron.models.fused_head import HeadInput
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.trainer import actor

    arch = arch_from_hf(read_hf_config(hf_dir))
    policy = build_model(arch, model=ModelConfig(hf_path=hf_dir, transformer_impl="local"),
                         parallel=ParallelConfig(**layout), optimizer=OptimizerConfig())
    micro = _micro(arch.vocab_size)
    seen: list[Any] = []

    def probe(fn: Any) -> actor.HeadLoss:  # records what the loss received: logits or the head's input
        def wrapped(output: Any, batch: dict[str, torch.Tensor]) -> Any:
            if isinstance(output, HeadInput):
                gpt = policy.gpt
                seen.append("embedding" if output.weight is gpt.embedding.word_embeddings.weight else
                            "output_layer" if output.weight is gpt.output_layer.weight else "?")
                # the weight's gradient goes straight into DDP's accumulator (no [V/tp, H] gradient tensor)
                assert getattr(output.weight, "main_grad", None) is not None
            else:
                seen.append(tuple(output.shape))
            return fn(output, batch)

        return actor.HeadLoss(wrapped)

    def entropy_loss(output: Any, batch: dict[str, torch.Tensor]) -> Any:
        lp, ent = actor._next_token_logprobs(output, batch["targets"], group=actor._tp_group(),
                                             temperature=TEMPERATURE)
        return (lp * batch["mask"]).sum() * 0.3 + (ent * batch["mask"]).sum(), {}

    def plain(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> Any:
        seen.append(tuple(logits.shape))
        return logits.float().square().mean(), {}

    results: dict[bool, Any] = {}
    for fused in (False, True):
        policy.fused_logprobs = fused
        lp = actor.token_logprobs(policy, micro, temperature=TEMPERATURE)
        assert lp is not None
        micro[0]["old_logprobs"] = lp[0] + 0.05  # the same on both paths: ratios ~0.95, some clipped
        loss = actor.policy_loss_fn(PolicyLossConfig(name="nsr"), step=0, temperature=TEMPERATURE,
                                    global_num_tokens=micro[0]["mask"].sum(),
                                    global_num_seqs=torch.tensor(float(ROWS)), scale=1.0)
        grads: list[list[torch.Tensor]] = []
        sums: list[Any] = []
        for fn in (probe(loss), probe(entropy_loss), plain):
            actor.zero_grads(policy)
            sums.append(actor.forward_backward(policy, micro, fn))
            grads.append([b.grad_data.clone() for b in policy.module.buffers])
        results[fused] = (lp[0], grads, sums)
    logits_shape = (ROWS, S, arch.vocab_size // 2)
    weight = "embedding" if arch.tie_word_embeddings else "output_layer"
    assert seen == [logits_shape] * 3 + [weight, weight, logits_shape], (name, seen)
    (lp_old, grads_old, sums_old), (lp_new, grads_new, sums_new) = results[False], results[True]
    torch.testing.assert_close(lp_new, lp_old, rtol=1e-6, atol=2e-6, msg=name)
    torch.testing.assert_close(sums_new[0][0]["loss_sum"], sums_old[0][0]["loss_sum"], rtol=1e-6, atol=1e-7)
    for which, (new, old) in enumerate(zip(grads_new, grads_old, strict=True)):
        for a, b in zip(new, old, strict=True):
            assert float(b.abs().max()) > 0, (name, which)
            if which == 2:  # the plain loss took the logits path both times
                assert torch.equal(a, b), (name, which)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * float(b.abs().max()),
                                           msg=f"{name} loss {which}")


def model_worker(rank: int, world: int, init: str, root: str) -> None:
    from nsr_megatron import parallel
    from nsr_megatron.config import ParallelConfig

    parallel.initialize(ParallelConfig(tp=2, sequence_parallel=True), seed=5, rank=rank, world_size=world,
                        init_method=init)
    check_op(rank, world)  # (a), in the same processes: one spawn for the whole file
    for name, (_, layout) in MODELS.items():
        _compare_paths(name, os.path.join(root, name), layout)
    parallel.destroy()


def test_fused_logprobs_under_tp2_equal_the_logits_path(tmp_path: Path) -> None:
    from nsr_megatron.models.tiny import write_tiny_hf_config

    for name, (overrides, _) in MODELS.items():
        write_tiny_hf_config(tmp_path / name, **overrides)
    run_workers(model_worker, 2, str(tmp_path))
