"""Turn generations into training tensors: sequences, masks, advantages, micro-batches.

Legend: K samples in the step, B sequences of a micro-batch, S padded sequence length, T = S - 1 target
positions (position t predicts token t + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Sample", "dp_shard", "mini_batches", "pack_micro_batches"]


@dataclass(kw_only=True)
class Sample:
    """One response with everything the loss needs. ``uid`` is unique within the RL step (rescue draws
    hash it with the seed, the step and the token index)."""

    uid: int
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    advantage: float
    routed_experts: torch.Tensor | None = None  # [P + R - 1, L, k]: the engine's experts per token (MoE)


def dp_shard(samples: list[Sample], dp_rank: int, dp_size: int) -> list[Sample]:
    """Data-parallel rank ``dp_rank``'s round-robin share of ``samples`` (the driver splits a step's samples)."""
    return samples[dp_rank::dp_size]


def mini_batches(samples: list[Sample], count: int) -> list[list[Sample]]:
    """Split into ``count`` contiguous, nearly equal mini-batches (one optimizer step each)."""
    count = max(1, min(count, len(samples)))
    size, extra = divmod(len(samples), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(samples[start:end])
        start = end
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_micro_batches(
    samples: list[Sample], *, max_tokens: int, pad_id: int, seq_multiple: int = 1, seq_len: int | None = None,
    uniform_rows: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Group samples (in order) into micro-batches of at most ``max_tokens`` padded tokens.

    Every micro-batch is padded on the right to one length ``S`` (``seq_len`` or the longest sample,
    rounded up to ``seq_multiple``, e.g. the TP size under sequence parallelism). A sample longer than
    the budget gets a micro-batch of its own. Returns dicts of:
      tokens [B, S] int64, targets [B, T] int64, mask [B, T] float32 (1 on response targets),
      token_index [B, T] int64 (position in the response), rollout_logprobs [B, T] float32,
      advantages [B] float32, sample_ids [B] int64, valid [B, S] bool (the real tokens: prompt and response),
      and when the samples carry the engine's routing, rollout_topk [B, S, L, k] int64 (-1 where it has none).

    With ``uniform_rows`` every micro-batch has the first one's B rows: a short last one gets rows of padding
    (tokens ``pad_id``, mask 0, advantage 0, sample id -1, not valid), which add nothing to a loss, its
    denominators or the routing statistics. Megatron's pipeline schedule needs it: it sends one activation shape
    between stages.
    """
    if not samples:
        return []
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    S = _round_up(max(seq_len or 0, longest, 2), seq_multiple)
    per_batch = max(1, max_tokens // S)
    batches = []
    for start in range(0, len(samples), per_batch):
        group = samples[start : start + per_batch]
        B = len(group)
        tokens = torch.full((B, S), pad_id, dtype=torch.int64)  # [B, S]
        mask = torch.zeros(B, S - 1)  # [B, T]
        token_index = torch.zeros(B, S - 1, dtype=torch.int64)  # [B, T]
        rollout_lp = torch.zeros(B, S - 1)  # [B, T]
        valid = torch.zeros(B, S, dtype=torch.bool)  # [B, S]
        for i, s in enumerate(group):
            p, r = len(s.prompt_ids), len(s.response_ids)
            tokens[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.int64)
            valid[i, : p + r] = True
            # Target position t predicts token t + 1: the response occupies targets [p - 1, p - 1 + r).
            mask[i, p - 1 : p - 1 + r] = 1.0
            token_index[i, p - 1 : p - 1 + r] = torch.arange(r)
            rollout_lp[i, p - 1 : p - 1 + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        routed = [s.routed_experts for s in group]
        rollout_topk = None
        if any(r is not None for r in routed):
            shape = next(e for e in routed if e is not None).shape[1:]  # [L, k]
            dtype = next(e for e in routed if e is not None).dtype
            known = [e if e is not None else torch.empty(0, *shape, dtype=dtype) for e in routed]
            rollout_topk = torch.full((B, S, *shape), -1, dtype=torch.int64)  # [B, S, L, k]
            padded = torch.nn.utils.rnn.pad_sequence(known, batch_first=True, padding_value=-1)  # one op, not B
            rollout_topk[:, : padded.shape[1]] = padded
        batches.append(
            {
                "tokens": tokens,
                "targets": tokens[:, 1:].clone(),
                "mask": mask,
                "token_index": token_index,
                "rollout_logprobs": rollout_lp,
                "advantages": torch.tensor([s.advantage for s in group], dtype=torch.float32),
                "sample_ids": torch.tensor([s.uid for s in group], dtype=torch.int64),
                "valid": valid,
            }
            | ({"rollout_topk": rollout_topk} if rollout_topk is not None else {})
        )
    if uniform_rows and len(batches) > 1:
        extra = batches[0]["tokens"].shape[0] - batches[-1]["tokens"].shape[0]
        if extra > 0:
            fill = {"tokens": pad_id, "targets": pad_id, "sample_ids": -1, "rollout_topk": -1}
            batches[-1] = {k: torch.cat([v, torch.full((extra, *v.shape[1:]), fill.get(k, 0), dtype=v.dtype)])
                           for k, v in batches[-1].items()}
    return batches
