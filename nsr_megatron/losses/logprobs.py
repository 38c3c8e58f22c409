"""Vocab-parallel per-token log-probs and entropy in one pass: exact, memory-bounded, hand-written backward.

The logits ``z`` [..., Vp] on a rank hold the vocabulary slice ``[start, start + Vp)`` of ``V = tp * Vp``
(Megatron's vocab-parallel layout: equal contiguous slices in rank order, so ``start = rank * Vp``). With
``x = z / temperature`` computed in fp32 (or the logits' dtype if wider), over the *full* vocabulary:

    M = max_v x_v,   s = sum_v exp(x_v - M),   logZ = M + log s
    logprob = x_y - logZ
    entropy = logZ - sum_v p_v x_v = log s - sum_v exp(x_v - M) (x_v - M) / s

The shifted form of the entropy avoids cancelling two large numbers. Gradients (``p = exp(x - logZ)`` and
``E_p[x] = logZ - entropy``):

    d logprob / d x_v = 1[v = y] - p_v
    d entropy / d x_v = -p_v (x_v - E_p[x]) = -p_v (x_v - logZ + entropy)
    d / d z = (d / d x) / temperature

Communication: per chunk of tokens, one ``all_gather_into_tensor`` of four local statistics per token
(local max, sum of exp, sum of exp * shifted logit, the target's logit if it lies in this shard else 0),
combined as a log-sum-exp. The backward needs no communication: it recomputes ``p`` per chunk from the
saved logits, ``logZ`` and the entropy. Nothing of size [N, Vp] is stored besides the logits themselves
(by reference) and the gradient it returns; temporaries are [chunk, Vp].

Shape legend: R x S tokens (rows x positions; N = R * S), Vp = V / tp this rank's vocabulary slice, C tokens
in a chunk, W ranks in the group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["vocab_parallel_logprobs_entropy"]

# Default chunk, in logits: on CPU 2**22 (16 MiB of fp32) so a chunk's passes stay in the last-level cache
# (log-prob + entropy on [512 x 151936]: 0.64 s against 0.99 s with 128 MiB chunks, bench/RESULTS.md);
# on accelerators 2**25 (128 MiB per temporary: few, large kernels).
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 25


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _scaled(z: Tensor, dtype: torch.dtype, inv_temperature: float) -> Tensor:
    """x = z / temperature in ``dtype``: a view of z when no conversion is needed, else a fresh tensor."""
    x = z.to(dtype)
    return x * inv_temperature if inv_temperature != 1.0 else x


def _chunks(rows: int, length: int, chunk: int) -> list[tuple[slice, slice]]:
    """(row slice, token slice) blocks of at most ``chunk`` tokens covering [rows, length]: whole rows
    together while a row fits in a chunk (many short rows: a few large blocks, not one small block per row),
    else pieces of one row."""
    if length <= chunk:
        per = chunk // max(length, 1)
        return [(slice(r, min(r + per, rows)), slice(0, length)) for r in range(0, rows, per)]
    return [(slice(i, i + 1), slice(a, min(a + chunk, length))) for i in range(rows) for a in range(0, length, chunk)]


class _LogProbEntropy(torch.autograd.Function):
    """Works on logits [R, S, Vp] whose last dimension is contiguous (the 3-D tensor may itself be a slice
    such as ``logits[:, :-1]``). A block ``logits[rows, a:b]`` [r, C, Vp] is reduced over its last dimension;
    the [r, C, Vp] temporaries are fresh and contiguous, so they are handled as [r * C, Vp] matrices."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        logits: Tensor,  # [R, S, Vp]
        targets: Tensor,  # [R, S] global vocabulary ids
        group: dist.ProcessGroup | None,
        temperature: float,
        chunk: int,
        vocab_start: int,
    ) -> tuple[Tensor, Tensor]:
        rows, length, vp = logits.shape
        dtype = torch.promote_types(logits.dtype, torch.float32)
        inv_t = 1.0 / temperature
        world = _group_size(group)
        fresh = logits.dtype != dtype or inv_t != 1.0  # x below is then a copy we may overwrite
        local = targets - vocab_start  # [R, S]
        in_shard = (local >= 0) & (local < vp)  # [R, S]
        index = torch.where(in_shard, local, 0)  # [R, S]
        logz = torch.empty(rows, length, dtype=dtype, device=logits.device)  # [R, S]
        entropy = torch.empty_like(logz)  # [R, S]
        logprob = torch.empty_like(logz)  # [R, S]
        for r, c in _chunks(rows, length, chunk):
            x = _scaled(logits[r, c], dtype, inv_t)  # [r, C, Vp]
            block = x.shape[:-1]  # (r, C)
            top = x.amax(dim=-1)  # [r, C] local max
            shifted = x.sub_(top[..., None]) if fresh else x - top[..., None]  # [r, C, Vp]
            shifted = shifted.reshape(-1, vp)  # [r * C, Vp] (fresh and contiguous: a view)
            top = top.reshape(-1)  # [r * C]
            picked = shifted.gather(1, index[r, c].reshape(-1, 1)).squeeze(1) + top  # [r * C]
            target = torch.where(in_shard[r, c].reshape(-1), picked, 0.0)  # [r * C]
            e = shifted.exp()  # [r * C, Vp]
            s = e.sum(dim=1)  # [r * C]
            sx = torch.bmm(e[:, None, :], shifted[:, :, None]).view(-1)  # [r * C] sum e * (x - top)
            del e, shifted, x
            if world > 1:
                n = len(s)
                stats = torch.stack([top, s, sx, target])  # [4, n]
                every = torch.empty((world * 4, n), dtype=dtype, device=logits.device)  # [W * 4, n]
                dist.all_gather_into_tensor(every, stats, group=group)
                tops, ss, sxs, tgts = every.view(world, 4, n).unbind(1)  # [W, n] each
                top = tops.amax(dim=0)  # [n] global max
                shift = tops - top  # [W, n] <= 0
                scale = shift.exp()  # [W, n]
                s = (ss * scale).sum(dim=0)
                sx = ((sxs + shift * ss) * scale).sum(dim=0)
                target = tgts.sum(dim=0)
            logs = s.log()
            z = top + logs
            logz[r, c] = z.view(block)
            entropy[r, c] = (logs - sx / s).view(block)
            logprob[r, c] = (target - z).view(block)
        ctx.save_for_backward(logits, index, in_shard, logz, entropy)
        ctx.set_materialize_grads(False)
        ctx.inv_t, ctx.chunk = inv_t, chunk  # type: ignore[attr-defined]
        return logprob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_logprob: Tensor | None, g_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        logits, index, in_shard, logz, entropy = ctx.saved_tensors
        inv_t, chunk = ctx.inv_t, ctx.chunk
        rows, length, _ = logits.shape
        dtype = logz.dtype
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [R, S, Vp] contiguous
        if g_logprob is None:
            g_logprob = torch.zeros_like(logz)
        g_logprob = g_logprob.to(dtype)  # [R, S]
        for r, c in _chunks(rows, length, chunk):
            out = grad[r, c] if grad.dtype == dtype else None  # [r, C, Vp]
            x = _scaled(logits[r, c], dtype, inv_t)  # [r, C, Vp]
            # x - logZ, into the gradient buffer when the dtypes match, else into x (then a fresh copy)
            t = torch.sub(x, logz[r, c, None], out=out) if out is not None else x.sub_(logz[r, c, None])
            if g_entropy is None:
                coef: Tensor = g_logprob[r, c, None]  # [r, C, 1]
            else:  # d/dx of (g_lp * logprob + g_H * H) = g_lp 1[v = y] - p (g_lp + g_H (x - logZ + H))
                coef = torch.add(t, entropy[r, c, None]).mul_(g_entropy[r, c, None].to(dtype))
                coef.add_(g_logprob[r, c, None])  # [r, C, Vp]
            p = t.exp_()  # [r, C, Vp]
            p.mul_(coef).neg_()
            p.scatter_add_(2, index[r, c, None], (g_logprob[r, c] * in_shard[r, c])[..., None])
            if inv_t != 1.0:
                p.mul_(inv_t)
            if out is None:
                grad[r, c].copy_(p)
        return grad, None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_start: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token ``log softmax(logits / temperature)[target]`` and entropy over a vocab-parallel shard.

    Args:
        logits: [..., Vp] this rank's vocabulary slice (any float dtype; computed in fp32 or wider). A
            [B, S, Vp] slice such as ``logits[:, :-1]`` is used in place (no copy) as long as its last
            dimension is contiguous.
        targets: [...] int64 token ids in the *global* vocabulary; a target outside this rank's slice
            contributes 0 there (another rank holds it).
        group: the tensor-parallel group the vocabulary is split over; None = the logits hold the whole
            vocabulary (no communication).
        temperature: divides the logits (> 0), as in sampling.
        chunk_size: tokens per chunk (bounds the [C, Vp] temporaries); default 2**22 / Vp on CPU (cache
            sized), 2**25 / Vp on accelerators.
        vocab_start: first vocabulary id of this slice; default ``rank_in_group * Vp``.

    Returns:
        ``(logprobs, entropy)``, each [...] in fp32 (or the logits' dtype if wider), both differentiable.
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature!r} must be > 0; use 1.0 for the plain softmax.")
    if logits.dim() < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}; expected the logits' leading shape "
            f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})."
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(
            f"chunk_size={chunk_size!r} must be a positive number of tokens, or None (automatic)."
        )
    vp = logits.shape[-1]
    if vocab_start is None:
        vocab_start = 0 if group is None else dist.get_rank(group) * vp
    budget = _CHUNK_ELEMENTS.get(logits.device.type, _CHUNK_ELEMENTS_ACCELERATOR)
    chunk = chunk_size if chunk_size is not None else max(1, budget // max(vp, 1))
    if logits.dim() == 3 and logits.stride(-1) == 1 and not logits.is_contiguous():
        view, tgt = logits, targets  # [B, S, Vp] slice: walk it row by row
    else:
        view, tgt = logits.reshape(1, -1, vp), targets.reshape(1, -1)  # [1, N, Vp] (a view if contiguous)
    args = (view, tgt.long(), group, temperature, chunk, vocab_start)
    logprob, entropy = _LogProbEntropy.apply(*args)  # type: ignore[no-untyped-call,unused-ignore]
    return logprob.view(targets.shape), entropy.view(targets.shape)
