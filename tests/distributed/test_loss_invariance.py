"""The loss, its gradients and NSR's rescue decisions do not depend on the parallel layout.

Two gloo processes split one batch by samples (data parallel), by tokens (context parallel: contiguous
and zigzag halves of every sequence, with ``token_index`` and ``seq_sum_fn``) and into micro-batches.
With global denominators the summed loss, the gradient of every token and the globally reduced
statistics (rescue counts included) equal the single-process result to fp32 rounding. A rescued token's
gradient is nonzero and a clipped one's is zero, so equal gradients also mean equal rescue decisions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from nsr_megatron.losses import (
    PolicyLossConfig,
    global_sums,
    loss_denominators,
    policy_loss,
    seq_sum_fn,
    vocab_parallel_logprobs_entropy,
)
from tests.distributed._gloo import run

B, T = 16, 24  # T divisible by 4 for the zigzag split

CONFIGS: list[tuple[str, dict[str, Any], bool]] = [  # (preset, overrides, per-token advantages)
    ("grpo", {}, False),
    ("dapo", {"dual_clip": 2.0}, True),
    ("nsr", {"sigma": 0.3}, False),
    (
        "nsr",
        {"sigma": 0.3, "rescue_level": "sequence", "rescued_value": "noisy_ratio", "sides": "upper"},
        True,
    ),
    ("nsr-decay", {"profile": "linear", "delta": 0.3}, False),
    ("nsr-widen", {"aggregation": "seq-mean-token-mean"}, False),
    ("nsr-gspo", {"eps_low": 0.02, "eps_high": 0.02, "sigma": 0.05}, False),
    ("gspo-token", {"eps_low": 0.02, "eps_high": 0.03}, True),
    ("cispo", {}, False),
    (
        "nsr",
        {
            "profile": "constant",
            "delta": 0.3,
            "aggregation": "seq-mean-token-sum-norm",
            "max_length": T,
            "tis_cap": 1.5,
            "mis_low": 0.6,
            "mis_high": 1.6,
            "kl_coef": 0.1,
        },
        False,
    ),
]


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    old = -torch.rand(B, T, generator=g) * 2.0
    cols = torch.arange(T)
    start = torch.randint(0, 4, (B, 1), generator=g)
    end = torch.randint(8, T + 1, (B, 1), generator=g)
    mask = ((cols >= start) & (cols < end)).float()
    mask[3] = 0.0  # an empty sequence
    return {
        "logprobs": old + torch.randn(B, T, generator=g) * 0.3,
        "old_logprobs": old,
        "ref_logprobs": old + torch.randn(B, T, generator=g) * 0.1,
        "rollout_logprobs": old + torch.randn(B, T, generator=g) * 0.3,
        "entropy": torch.rand(B, T, generator=g) * 3.0,
        "adv_seq": torch.randn(B, generator=g),
        "adv_tok": torch.randn(B, T, generator=g),
        "mask": mask,
        "sample_ids": 1000 + 7 * torch.arange(B),
    }


STEP = 17


def compute(
    cfg: PolicyLossConfig,
    data: dict[str, torch.Tensor],
    per_token_adv: bool,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    cp_group: dist.ProcessGroup | None,
    reduce_groups: list[dist.ProcessGroup | None],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (summed over micro-batches), gradient [B, T] (zero where not held) and the summed metric sums
    of this rank's micro-batches, each given as (rows [b], columns [t]) of the full batch."""
    sum_fn = seq_sum_fn(cp_group)

    def sl(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return x[rows][:, cols] if x.dim() == 2 else x[rows]

    den = global_sums(
        [
            loss_denominators(
                cfg,
                sl(data["mask"], r, c),
                old_logprobs=sl(data["old_logprobs"], r, c),
                rollout_logprobs=sl(data["rollout_logprobs"], r, c),
                seq_sum_fn=sum_fn,
            )
            for r, c in micro_batches
        ],
        reduce_groups,
    )
    grad = torch.zeros(B, T)
    total = torch.zeros(())
    all_sums = []
    for r, c in micro_batches:
        lp = sl(data["logprobs"], r, c).clone().requires_grad_()
        adv = data["adv_tok"] if per_token_adv else data["adv_seq"]
        loss, sums = policy_loss(
            cfg,
            lp,
            sl(data["old_logprobs"], r, c),
            sl(adv, r, c),
            sl(data["mask"], r, c),
            sample_ids=data["sample_ids"][r],
            step=STEP,
            token_index=c.expand(len(r), len(c)).contiguous(),
            global_num_tokens=den["tokens"],
            global_num_seqs=den["seqs"],
            seq_sum_fn=sum_fn,
            ref_logprobs=sl(data["ref_logprobs"], r, c),
            rollout_logprobs=sl(data["rollout_logprobs"], r, c),
            entropy=sl(data["entropy"], r, c),
        )
        loss.backward()
        assert lp.grad is not None
        grad[r[:, None], c[None, :]] = lp.grad
        total = total + loss.detach()
        all_sums.append(sums)
    return total, grad, global_sums(all_sums, reduce_groups)


def layouts(rank: int) -> dict[str, tuple[list[tuple[torch.Tensor, torch.Tensor]], bool]]:
    """name -> (this rank's micro-batches, context parallel?)."""
    rows, cols = torch.arange(B), torch.arange(T)
    mine = rows[rank::2]  # data parallel: interleaved samples
    q = T // 4
    contiguous = cols[rank * T // 2 : (rank + 1) * T // 2]
    zigzag = torch.cat([cols[rank * q : (rank + 1) * q], cols[(3 - rank) * q : (4 - rank) * q]])
    return {
        "dp": ([(mine, cols)], False),
        "dp+micro": ([(mine[:3], cols), (mine[3:4], cols), (mine[4:], cols)], False),
        "cp-contiguous": ([(rows, contiguous)], True),
        "cp-zigzag": ([(rows, zigzag)], True),
        "cp-zigzag+micro": ([(rows[:5], zigzag), (rows[5:], zigzag)], True),
    }


V = 12  # vocabulary of the tensor-parallel check, split in halves over the two ranks


def _tensor_parallel_ranks_agree(
    cfg: PolicyLossConfig, data: dict[str, torch.Tensor], per_token: bool, label: str, rank: int, world_size: int
) -> None:
    """Each rank holds half of the vocabulary of the logits; the log-probs come from the vocab-parallel op. Both
    ranks must reach bitwise identical log-probs, loss and statistics (rescue decisions included), matching the
    full-vocabulary computation of one process, and their logit gradients must assemble the full one."""
    g = torch.Generator().manual_seed(99)
    logits = torch.randn(B, T, V, generator=g) * 2.0
    targets = torch.randint(0, V, (B, T), generator=g)
    half = V // world_size
    adv = data["adv_tok"] if per_token else data["adv_seq"]

    def loss_and_grad(x: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[Any, ...]:
        x = x.clone().requires_grad_()
        lp, ent = vocab_parallel_logprobs_entropy(x, targets, group=group,
                                                  vocab_start=rank * half if group is not None else None)
        loss, sums = policy_loss(cfg, lp, data["old_logprobs"], adv, data["mask"], sample_ids=data["sample_ids"],
                                 step=STEP, ref_logprobs=data["ref_logprobs"],
                                 rollout_logprobs=data["rollout_logprobs"], entropy=ent.detach())
        loss.backward()
        return lp.detach(), loss.detach(), sums, x.grad

    full_lp, full_loss, full_sums, full_grad = loss_and_grad(logits, None)
    lp, loss, sums, grad = loss_and_grad(logits[..., rank * half:(rank + 1) * half], dist.group.WORLD)
    for name, mine in [("logprobs", lp), ("loss", loss)] + [(k, v) for k, v in sorted(sums.items())]:
        gathered = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine.contiguous())
        assert all(torch.equal(x, gathered[0]) for x in gathered), f"{label}: TP ranks disagree on {name}"
    torch.testing.assert_close(lp, full_lp, rtol=1e-6, atol=1e-6, msg=label)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-7, msg=label)
    counts = ("clip/upper_sum", "clip/lower_sum") + (
        ("rescue/upper_sum", "rescue/lower_sum") if cfg.rescue == "stochastic" else ())
    for key in counts:  # the same tokens are clipped and rescued
        assert sums[key] == full_sums[key], (label, key, float(sums[key]), float(full_sums[key]))
    parts = [torch.empty_like(grad) for _ in range(world_size)]
    dist.all_gather(parts, grad.contiguous())
    torch.testing.assert_close(torch.cat(parts, dim=-1), full_grad, rtol=1e-5, atol=1e-7, msg=label)


def invariance_worker(rank: int, world_size: int) -> None:
    data = make_batch()
    world = dist.group.WORLD
    for name, overrides, per_token in CONFIGS:
        cfg = PolicyLossConfig(name=name, **overrides)
        everything = [(torch.arange(B), torch.arange(T))]
        ref_loss, ref_grad, ref_sums = compute(cfg, data, per_token, everything, None, [])
        label = f"{name} {overrides}"
        stochastic = cfg.rescue == "stochastic"
        if stochastic:  # the batch must exercise rescued and non-rescued clipped tokens
            rescued = float(ref_sums["rescue/upper_sum"] + ref_sums["rescue/lower_sum"])
            clipped = float(ref_sums["clip/upper_sum"] + ref_sums["clip/lower_sum"])
            assert 0 < rescued < clipped, (label, rescued, clipped)
        _tensor_parallel_ranks_agree(cfg, data, per_token, label, rank, world_size)
        for layout, (micro, cp) in layouts(rank).items():
            loss, grad, sums = compute(cfg, data, per_token, micro, world if cp else None, [world])
            dist.all_reduce(loss)
            dist.all_reduce(grad)  # every token is held by exactly one rank
            where = f"{label} / {layout}"
            torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=1e-7, msg=where)
            torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-8, msg=where)
            assert sums.keys() == ref_sums.keys(), where
            for key, value in ref_sums.items():
                counts = ("clip/upper", "clip/lower", "clip/dual", "band/", "tokens") + (
                    ("rescue/upper", "rescue/lower") if stochastic else ()
                )
                if key.startswith(counts):
                    assert sums[key] == value, (where, key, float(sums[key]), float(value))  # counts: exact
                else:
                    torch.testing.assert_close(sums[key], value, rtol=1e-5, atol=1e-9, msg=f"{where} {key}")


def test_loss_gradients_and_rescues_are_layout_invariant() -> None:
    run(invariance_worker, 2)
