"""Per-token log-probs and entropy straight from the last hidden states and the vocab-parallel output weight:
the logits ``z = h W^T`` are made one tile at a time and never exist whole, in the forward or the backward.

Shape legend: N tokens (the hidden states' leading dimensions flattened), H hidden size, Vp = V / tp this
rank's vocabulary slice (the rows of its output weight), C tokens in a chunk, Vb vocabulary rows in a slice (a
tile of logits is [C, Vb]), K parts being merged, W ranks in the group.

Maths. ``z = h W^T`` is computed by the GEMM in the model's dtype, as megatron's output layer computes it, then
promoted to fp32 (or the model's dtype if wider) and divided by the temperature, as in
:mod:`nsr_megatron.losses.logprobs`: ``x = z / temperature``. Over the *full* vocabulary

    logZ = log sum_v exp(x_v),   p = exp(x - logZ),   logprob = x_y - logZ,   entropy = logZ - sum_v p_v x_v

Each tile (one slice b of the vocabulary, one chunk of tokens) yields its own normaliser and entropy in the
shifted form of :mod:`.logprobs` (``M_b`` the tile's max, ``s_b = sum_{v in b} exp(x_v - M_b)``):

    logZ_b = M_b + log s_b,   H_b = log s_b - sum_{v in b} exp(x_v - M_b) (x_v - M_b) / s_b

and disjoint parts of the vocabulary combine by the chain rule of entropy, with shares
``w_b = exp(logZ_b - logZ)`` (:func:`_merge`):

    logZ = log sum_b exp(logZ_b),   entropy = sum_b w_b (H_b + logZ - logZ_b)

every term non-negative, so nothing cancels. The same merge joins a rank's slices and then the group's ranks:
one ``all_gather_into_tensor`` of three numbers per token (``logZ_r``, ``H_r`` and ``x_y`` where rank r holds
y, else 0). The merges run in fp64 (O(N) numbers per tile), so the result carries the rounding of each tile's
fp32 reductions only, as the logits op does.

Gradients, with g and gH the upstream gradients of logprob and entropy (the logits op's, per tile):

    dz_v = (g 1[v = y] - p_v (g + gH (x_v - logZ + entropy))) / temperature     [C, Vb], rounded to the model's dtype
    d/dh = dz W      [N, H]   partial: this rank's vocabulary slice only; the caller sums it over the group
                              (megatron's mapping around the output layer: all-reduce, or reduce-scatter under
                              sequence parallelism)
    d/dW = dz^T h    [Vp, H]  returned, or added slice by slice into the weight's ``main_grad`` when given
                              (megatron DDP's fp32 accumulator): then no [Vp, H] gradient tensor exists

The backward recomputes every tile's ``z`` with the forward's GEMM shapes (the same bits) from the saved h, W,
targets, logZ and entropy. Its loops run over vocabulary slices outside and token chunks inside: a slice's
``d/dW`` is one GEMM when all tokens fit one chunk (as the logits path's single GEMM rounds it), else an fp32 sum
[Vb, H] over the chunks; ``d/dh`` is an fp32 sum [N, H] over the slices (in place when h is fp32 or wider; with
bf16 each slice's product is rounded to bf16 before the fp32 sum). Token chunks outside would instead
read and write a whole [Vp, H] fp32 gradient per chunk: 1.2 GB at Qwen3's 151,936 x 2048, TP=1.

Memory: nothing of size [N, Vp]; the temporaries are [C, Vb] (at most the logits op's budget: 2**22 elements
on CPU, 2**25 on accelerators), plus the fp32 sum of ``d/dh`` [N, H] and of one slice's ``d/dW`` [Vb, H]. By
default the tile is square, 2048 x 2048 on CPU and 4096 tokens x 8192 rows on accelerators (fewer tokens: one
chunk and ``budget / N`` rows, at least 256), which makes the fp32 sums' traffic least (:func:`_tile_shape`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from nsr_megatron.losses.logprobs import _CHUNK_ELEMENTS, _CHUNK_ELEMENTS_ACCELERATOR, _group_size

__all__ = ["fused_logprobs_entropy"]

# The smallest default vocabulary slice: narrower tiles make slow, skinny GEMMs.
_MIN_SLICE = 256


def _tile_shape(n: int, vp: int, budget: int, chunk_size: int | None, vocab_chunk_size: int | None) -> tuple[int, int]:
    """(C, Vb): tokens and vocabulary rows per tile, at most ``budget`` logits. By default a square tile
    (sqrt(budget), a power of two: 2048 on CPU, 4096 x 8192 on accelerators), taller when there are fewer tokens.
    The backward adds every [C, Vb] tile's products into an fp32 [C, H] and [Vb, H] sum: its traffic,
    H * N * Vp * (1 / C + 1 / Vb), is least for a square tile."""
    side = 1 << (budget.bit_length() - 1) // 2
    if chunk_size is None:
        chunk_size = max(1, budget // vocab_chunk_size) if vocab_chunk_size else side
    chunk = max(1, min(chunk_size, n))
    vchunk = max(1, min(vocab_chunk_size or max(_MIN_SLICE, budget // chunk), vp))
    return chunk, vchunk


def _spans(total: int, step: int) -> list[slice]:
    return [slice(a, min(a + step, total)) for a in range(0, total, step)]


def _tile_logits(h: Tensor, w: Tensor, dtype: torch.dtype, inv_t: float) -> Tensor:
    """x = (h_c W_b^T) / temperature [C, Vb] in ``dtype``: the model's GEMM, promoted; a fresh tensor."""
    x = torch.mm(h, w.t()).to(dtype)  # [C, Vb]
    return x.mul_(inv_t) if inv_t != 1.0 else x


def _merge(logz: Tensor, entropy: Tensor) -> tuple[Tensor, Tensor]:
    """(logZ, entropy) [K, n] of K disjoint parts of the vocabulary -> (logZ, entropy) [n] of their union."""
    total = torch.logsumexp(logz, dim=0)  # [n]
    gap = total - logz  # [K, n] -log(share) >= 0
    return total, (gap.neg().exp() * (entropy + gap)).sum(dim=0)


def _tile_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """(logZ_b, H_b) [C] in fp64 of a tile x [C, Vb] (overwritten: shifted by its row maxima)."""
    top = x.amax(dim=1)  # [C]
    shifted = x.sub_(top[:, None])  # [C, Vb]
    e = shifted.exp()  # [C, Vb]
    s = e.sum(dim=1).double()  # [C]
    sx = torch.bmm(e[:, None, :], shifted[:, :, None]).view(-1).double()  # [C] sum e * (x - top)
    logs = s.log()
    return top.double() + logs, logs - sx / s


def _mm_into(out: Tensor, a: Tensor, b: Tensor, *, add: bool, scratch: Tensor | None) -> None:
    """out = a @ b, or out += a @ b. When ``out`` is wider than a and b, the product goes through ``scratch``
    (a reused buffer in their dtype: a fresh one per tile costs page faults) and is rounded to their dtype first
    (one GEMM in the model's dtype, as the logits path's)."""
    if out.dtype == a.dtype:
        if add:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    assert scratch is not None
    prod = torch.mm(a, b, out=scratch[: a.shape[0]])
    if add:
        out.add_(prod)
    else:
        out.copy_(prod)


class _FusedLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [Vp, H]
        targets: Tensor,  # [N] global vocabulary ids
        group: dist.ProcessGroup | None,
        temperature: float,
        chunk: int,
        vchunk: int,
        vocab_start: int,
        main_grad: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        n, vp = hidden.shape[0], weight.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        inv_t = 1.0 / temperature
        local = targets - vocab_start  # [N] row of the target in this rank's weight (outside [0, Vp): elsewhere)
        logz = torch.empty(n, dtype=torch.float64, device=hidden.device)  # [N]
        entropy = torch.empty_like(logz)  # [N]
        target = torch.zeros_like(logz)  # [N] x_y where this rank holds y, else 0
        for b in _spans(vp, vchunk):
            for c in _spans(n, chunk):
                x = _tile_logits(hidden[c], weight[b], dtype, inv_t)  # [C, Vb]
                col = local[c] - b.start  # [C]
                here = (col >= 0) & (col < x.shape[1])  # [C]
                picked = x.gather(1, torch.where(here, col, 0)[:, None]).squeeze(1)  # [C]
                target[c] += torch.where(here, picked, 0.0).double()
                tile_z, tile_h = _tile_stats(x)  # [C] each
                if b.start == 0:
                    logz[c], entropy[c] = tile_z, tile_h
                else:
                    logz[c], entropy[c] = _merge(torch.stack([logz[c], tile_z]), torch.stack([entropy[c], tile_h]))
        world = _group_size(group)
        if world > 1:
            every = torch.empty((world * 3, n), dtype=torch.float64, device=hidden.device)  # [W * 3, N]
            dist.all_gather_into_tensor(every, torch.stack([logz, entropy, target]), group=group)
            logzs, entropies, targets_ = every.view(world, 3, n).unbind(1)  # [W, N] each
            logz, entropy = _merge(logzs, entropies)
            target = targets_.sum(dim=0)
        logprob = (target - logz).to(dtype)  # [N]
        logz_, entropy_ = logz.to(dtype), entropy.to(dtype)  # [N] each
        ctx.save_for_backward(hidden, weight, targets, logz_, entropy_)
        ctx.set_materialize_grads(False)
        ctx.tiles = (inv_t, chunk, vchunk, vocab_start)  # type: ignore[attr-defined]
        ctx.main_grad = main_grad  # type: ignore[attr-defined]
        return logprob, entropy_

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_logprob: Tensor | None, g_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, targets, logz, entropy = ctx.saved_tensors
        inv_t, chunk, vchunk, vocab_start = ctx.tiles
        need_h, need_w = ctx.needs_input_grad[:2]
        none = (None,) * 7
        if (g_logprob is None and g_entropy is None) or not (need_h or need_w):
            return (None, None, *none)
        n, vp = hidden.shape[0], weight.shape[0]
        if n == 0:
            return (torch.zeros_like(hidden) if need_h else None, torch.zeros_like(weight) if need_w else None, *none)
        dtype = logz.dtype
        g = g_logprob.to(dtype) if g_logprob is not None else torch.zeros_like(logz)  # [N]
        g_h = g_entropy.to(dtype) if g_entropy is not None else None  # [N]
        local = targets - vocab_start  # [N]
        chunks, slices = _spans(n, chunk), _spans(vp, vchunk)
        wide = torch.promote_types(hidden.dtype, torch.float32)
        width, device = hidden.shape[1], hidden.device
        grad_h = torch.empty_like(hidden) if need_h else None  # [N, H]
        # d/dh summed over slices in fp32 or wider (in place when h is), or one GEMM when there is one slice
        sum_h = grad_h if grad_h is None or len(slices) == 1 or hidden.dtype == wide else torch.empty_like(
            hidden, dtype=wide)
        main = ctx.main_grad if need_w else None  # [Vp, H] d/dW is added here, slice by slice, when given
        grad_w = torch.empty_like(weight) if need_w and main is None else None  # [Vp, H]
        # one slice's d/dW on its way into main_grad: the values grad_w[b] would hold
        slice_w = torch.empty((min(vchunk, vp), width), dtype=weight.dtype, device=device) if (
            main is not None) else None  # [Vb, H]
        sum_w = None  # [Vb, H] one slice's d/dW summed over chunks, when the weight is narrower than fp32
        if need_w and len(chunks) > 1 and weight.dtype != wide:
            sum_w = torch.empty((min(vchunk, vp), width), dtype=wide, device=device)
        # products in the model's dtype on their way into the fp32 sums: [C, H] and [Vb, H]
        scratch_h = torch.empty((min(chunk, n), width), dtype=hidden.dtype, device=device) if (
            sum_h is not None and sum_h.dtype != hidden.dtype) else None
        scratch_w = torch.empty((min(vchunk, vp), width), dtype=weight.dtype, device=device) if (
            sum_w is not None) else None
        for b in slices:
            w_b, rows = weight[b], b.stop - b.start  # [Vb, H]
            dest = grad_w[b] if grad_w is not None else None if slice_w is None else slice_w[:rows]  # [Vb, H]
            out_w = None if dest is None else dest if sum_w is None else sum_w[:rows]
            for i, c in enumerate(chunks):
                t = _tile_logits(hidden[c], w_b, dtype, inv_t).sub_(logz[c, None])  # [C, Vb] x - logZ
                if g_h is None:
                    coef: Tensor = g[c, None]  # [C, 1]
                else:  # d/dx of (g logprob + gH entropy) = g 1[v = y] - p (g + gH (x - logZ + entropy))
                    coef = torch.add(t, entropy[c, None]).mul_(g_h[c, None]).add_(g[c, None])  # [C, Vb]
                dz = t.exp_().mul_(coef).neg_()  # [C, Vb]
                col = local[c] - b.start  # [C]
                here = (col >= 0) & (col < dz.shape[1])  # [C]
                dz.scatter_add_(1, torch.where(here, col, 0)[:, None], (g[c] * here)[:, None])
                if inv_t != 1.0:
                    dz.mul_(inv_t)
                dz = dz.to(hidden.dtype)  # [C, Vb] as the logits op returns it: in the logits' (model's) dtype
                if sum_h is not None:
                    _mm_into(sum_h[c], dz, w_b, add=b.start > 0, scratch=scratch_h)
                if out_w is not None:
                    _mm_into(out_w, dz.t(), hidden[c], add=i > 0, scratch=scratch_w)
            if dest is not None and sum_w is not None:
                dest.copy_(sum_w[:rows])
            if main is not None:  # as megatron DDP's hook adds a returned gradient: main_grad += d/dW
                assert dest is not None
                main[b].add_(dest)
        if grad_h is not None and sum_h is not grad_h:
            assert sum_h is not None
            grad_h.copy_(sum_h)
        return (grad_h, grad_w, *none)


def fused_logprobs_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    vocab_start: int | None = None,
    main_grad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token ``log softmax((hidden @ weight.T) / temperature)[target]`` and entropy over a vocab-parallel
    output weight, without a logits tensor: equal to :func:`vocab_parallel_logprobs_entropy` on
    ``hidden @ weight.T`` (see the module docstring for the maths and the tiling).

    Args:
        hidden: [..., H] the last hidden states (after the final norm), the same on every rank of ``group``.
            Reshaped to [N, H]: a copy when it is a non-contiguous view such as ``hidden[:, :-1]``.
        weight: [Vp, H] this rank's slice of the output weight (rows ``[vocab_start, vocab_start + Vp)`` of the
            vocabulary), in ``hidden``'s dtype. Its gradient is this rank's; ``hidden``'s is this rank's
            partial sum, which the caller reduces over ``group``.
        targets: [...] int64 token ids in the *global* vocabulary.
        group: the tensor-parallel group the vocabulary is split over; None = ``weight`` holds all of it.
        temperature: divides the logits (> 0), as in sampling.
        chunk_size: tokens per tile (default: all of them, up to budget / 256).
        vocab_chunk_size: vocabulary rows per tile (default: budget / tokens per tile, at least 256); the budget
            is the logits op's, 2**22 elements on CPU and 2**25 on accelerators.
        vocab_start: first vocabulary id of this slice; default ``rank_in_group * Vp``.
        main_grad: [Vp, H] the weight's gradient accumulator (megatron DDP's ``param.main_grad``, fp32 or the
            weight's dtype). When given, the backward adds the weight's gradient into it one vocabulary slice at
            a time, with the values the returned gradient would have had, and returns no gradient for the
            weight: no [Vp, H] gradient tensor exists (594 MiB in bf16 at Qwen3's 151,936 x 2048). Only for a
            weight whose gradient DDP would add to ``main_grad`` anyway, without waiting for it
            (``overlap_grad_reduce=False``): with overlap, the bucket would never hear that the gradient is
            ready.

    Returns:
        ``(logprobs, entropy)``, each [...] in fp32 (or the model's dtype if wider), both differentiable.
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature!r} must be > 0; use 1.0 for the plain softmax.")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} and hidden {tuple(hidden.shape)}; expected weight "
            f"[Vp, H] with H = hidden.shape[-1] (the output layer's weight, not its transpose)."
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}; expected the hidden states' leading shape "
            f"{tuple(hidden.shape[:-1])} (hidden {tuple(hidden.shape)})."
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden is {hidden.dtype} and weight {weight.dtype}; the logits GEMM needs one dtype (the model's): "
            "cast the hidden states to the weight's dtype."
        )
    if main_grad is not None and main_grad.shape != weight.shape:
        raise ValueError(
            f"main_grad has shape {tuple(main_grad.shape)} and weight {tuple(weight.shape)}; pass the weight's "
            "own accumulator (param.main_grad), or None to return the gradient."
        )
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value!r} must be a positive number, or None (automatic).")
    n, vp = targets.numel(), weight.shape[0]
    if vocab_start is None:
        vocab_start = 0 if group is None else dist.get_rank(group) * vp
    budget = _CHUNK_ELEMENTS.get(hidden.device.type, _CHUNK_ELEMENTS_ACCELERATOR)
    chunk, vchunk = _tile_shape(n, vp, budget, chunk_size, vocab_chunk_size)
    args = (hidden.reshape(n, hidden.shape[-1]), weight, targets.reshape(n).long(), group, temperature, chunk,
            vchunk, vocab_start, main_grad)
    logprob, entropy = _FusedLogProbEntropy.apply(*args)  # type: ignore[no-untyped-call,unused-ignore]
    return logprob.view(targets.shape), entropy.view(targets.shape)
