"""Fused log-probs and entropy from hidden states and the output weight, on one process: values and gradients
equal the logits op applied to ``hidden @ weight.T`` (and float64 ground truth), for every tiling."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nsr_megatron.losses import fused_logprobs_entropy, vocab_parallel_logprobs_entropy

N, H, V = 37, 24, 100


def _inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)  # [N, H]
    weight = (torch.randn(V, H, generator=g) * 0.8).to(dtype)  # [V, H] logits of std ~4
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets


def _run(op: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, w_lp: torch.Tensor | None,
         w_ent: torch.Tensor | None, **kw: Any) -> tuple[torch.Tensor, ...]:
    """(logprob, entropy, d/dhidden, d/dweight) of sum(w_lp * logprob + w_ent * entropy)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    if op == "fused":
        lp, ent = fused_logprobs_entropy(h, w, targets, **kw)
    elif op == "logits":  # today's path: the GEMM in the model's dtype, then the logits op
        lp, ent = vocab_parallel_logprobs_entropy(h @ w.t(), targets, **kw)
    else:  # float64 ground truth on the same (rounded) inputs
        logp = torch.log_softmax((h.double() @ w.double().t()) / float(kw.get("temperature", 1.0)), dim=-1)
        lp, ent = logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    objective = torch.zeros((), dtype=torch.float64)
    if w_lp is not None:
        objective = objective + (lp.double() * w_lp.double()).sum()
    if w_ent is not None:
        objective = objective + (ent.double() * w_ent.double()).sum()
    objective.backward()
    assert h.grad is not None and w.grad is not None
    return lp.detach(), ent.detach(), h.grad, w.grad


TILINGS = [(None, None), (5, None), (None, 16), (7, 13), (1, 100), (N, 1), (1000, 1000)]


@pytest.mark.parametrize(("chunk", "vchunk"), TILINGS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_equals_the_logits_op(chunk: int | None, vchunk: int | None, temperature: float) -> None:
    hidden, weight, targets = _inputs(torch.float32)
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    got = _run("fused", hidden, weight, targets, w_lp, w_ent, temperature=temperature, chunk_size=chunk,
               vocab_chunk_size=vchunk)
    ref = _run("logits", hidden, weight, targets, w_lp, w_ent, temperature=temperature)
    truth = _run("float64", hidden, weight, targets, w_lp, w_ent, temperature=temperature)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[0].shape == (N,)
    assert got[2].dtype == got[3].dtype == torch.float32
    for a, b, name in zip(got[:2], ref[:2], ("logprob", "entropy"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=2e-6, msg=name)
    # gradients: fp32 sums in another order (tiles) than the logits path's GEMMs; elements near 0 get an atol of
    # 2e-6 of the largest (fp32 GEMMs over H terms); the logits path is as far from the float64 truth
    for a, b, t, name in zip(got[2:], ref[2:], truth[2:], ("d/dhidden", "d/dweight"), strict=True):
        atol = 2e-6 * float(t.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=name)
        torch.testing.assert_close(a, t.float(), rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize(("chunk", "vchunk"), [(None, None), (5, 16), (7, None), (None, 13)])
def test_bf16_within_the_logits_ops_tolerance(chunk: int | None, vchunk: int | None) -> None:
    """bf16 hidden states and weight: the tile GEMMs give the logits GEMM's bits, so the values match the logits
    op to fp32 rounding; gradients are rounded to bf16 in both (the logits' gradient, then the GEMMs' outputs;
    fused with several tiles also sums bf16 partial products in fp32): both are within the logits op's bf16
    tolerance of the float64 ground truth, elementwise (rtol 8e-3 as tests/unit/test_losses_logprobs.py, atol
    scaled to the gradient), and no worse than the logits path overall."""
    hidden, weight, targets = _inputs(torch.bfloat16, seed=2)
    g = torch.Generator().manual_seed(3)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    got = _run("fused", hidden, weight, targets, w_lp, w_ent, temperature=1.2, chunk_size=chunk,
               vocab_chunk_size=vchunk)
    ref = _run("logits", hidden, weight, targets, w_lp, w_ent, temperature=1.2)
    for a, b, name in zip(got[:2], ref[:2], ("logprob", "entropy"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=2e-6, msg=name)
    # ground truth: float64 from the bf16 logits (which both paths use), back through the GEMMs in float64
    z = (hidden @ weight.t()).double().requires_grad_()
    logp = torch.log_softmax(z / 1.2, dim=-1)
    lp, ent = logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    (lp * w_lp.double() + ent * w_ent.double()).sum().backward()
    assert z.grad is not None
    truth = (z.grad @ weight.double(), z.grad.t() @ hidden.double())  # d/dhidden, d/dweight
    for a, b, t, name in zip(got[2:], ref[2:], truth, ("d/dhidden", "d/dweight"), strict=True):
        assert a.dtype == torch.bfloat16, name
        scale = float(t.abs().max())
        torch.testing.assert_close(a.double(), t, rtol=8e-3, atol=8e-3 * scale, msg=name)
        err, err_ref = float((a.double() - t).norm()), float((b.double() - t).norm())
        assert err <= 2.0 * err_ref + 1e-3 * float(t.norm()), (name, err, err_ref)
        if chunk is None and vchunk is None:  # one tile: the logits path's very GEMMs
            assert torch.equal(a, b), name


@pytest.mark.parametrize("which", ["logprob", "entropy", "both"])
def test_one_or_both_outputs_backward(which: str) -> None:
    hidden, weight, targets = _inputs(torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    w_lp = torch.randn(N, generator=g) if which in ("logprob", "both") else None
    w_ent = torch.randn(N, generator=g) if which in ("entropy", "both") else None
    got = _run("fused", hidden, weight, targets, w_lp, w_ent, temperature=0.8, chunk_size=6, vocab_chunk_size=30)
    ref = _run("logits", hidden, weight, targets, w_lp, w_ent, temperature=0.8)
    for a, b in zip(got[2:], ref[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * float(b.abs().max()))


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(6)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=g)
    for kw in ({"temperature": 0.7, "chunk_size": 4, "vocab_chunk_size": 4}, {"chunk_size": 1, "vocab_chunk_size": 2}):
        assert torch.autograd.gradcheck(lambda h, w, kw=kw: fused_logprobs_entropy(h, w, y, **kw), (h, w))
    assert torch.autograd.gradcheck(lambda h, w: fused_logprobs_entropy(h, w, y, vocab_chunk_size=3)[1], (h, w))
    assert torch.autograd.gradcheck(lambda h, w: fused_logprobs_entropy(h, w, y, chunk_size=2)[0], (h, w))


def test_batched_hidden_slice_and_frozen_weight() -> None:
    """[B, S, H] hidden states sliced as the trainer does (``hidden[:, :-1]``), and a weight without gradient (the
    reference model): the values match, the last position gets no gradient, the weight none."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 9, H, generator=g, requires_grad=True)  # [B, S, H]
    weight = torch.randn(V, H, generator=g) * 0.5  # [V, H]
    y = torch.randint(0, V, (3, 8), generator=g)
    lp, ent = fused_logprobs_entropy(hidden[:, :-1], weight, y, chunk_size=5, vocab_chunk_size=40)
    assert lp.shape == ent.shape == (3, 8)
    (lp + 0.5 * ent).sum().backward()
    got = hidden.grad
    hidden.grad = None
    lp_ref, ent_ref = vocab_parallel_logprobs_entropy(hidden[:, :-1] @ weight.t(), y)
    (lp_ref + 0.5 * ent_ref).sum().backward()
    torch.testing.assert_close(lp, lp_ref, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-6, atol=2e-6)
    assert got is not None and hidden.grad is not None
    torch.testing.assert_close(got, hidden.grad, rtol=1e-5, atol=2e-6)
    assert torch.equal(got[:, -1], torch.zeros(3, H))


def test_entropy_is_accurate_for_peaked_distributions() -> None:
    """p(0) = 1 - 9e-11 (entropy 2.9e-9): the slices' merge adds non-negative terms, no cancellation."""
    hidden = torch.tensor([[30.0, 0.0], [30.0, 0.0]])  # [2, H=2]
    weight = torch.zeros(1000, 2)
    weight[0, 0] = 1.0  # logits: 30 for token 0, 0 elsewhere
    lp, ent = fused_logprobs_entropy(hidden, weight, torch.tensor([0, 1]), vocab_chunk_size=64)
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), dim=-1)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), rtol=0.0, atol=2e-10)
    torch.testing.assert_close(lp.double(), logp[[0, 1], [0, 1]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("chunk", "vchunk"), [(None, None), (7, 13), (N, 16), (5, 1000)])
def test_main_grad_gets_what_the_returned_gradient_would_add(dtype: torch.dtype, chunk: int | None,
                                                             vchunk: int | None) -> None:
    """With ``main_grad`` (megatron DDP's fp32 accumulator) the weight's gradient is added there, bit for bit
    what DDP's hook adds from the returned gradient, onto what the accumulator held; no gradient is returned."""
    hidden, weight, targets = _inputs(dtype, seed=9)
    held = torch.randn(V, H, generator=torch.Generator().manual_seed(10))  # [V, H] earlier micro-batches
    kw: dict[str, Any] = {"temperature": 0.7, "chunk_size": chunk, "vocab_chunk_size": vchunk}
    outs = []
    for direct in (False, True):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        main = held.clone()
        lp, ent = fused_logprobs_entropy(h, w, targets, main_grad=main if direct else None, **kw)
        (lp.sum() * 0.5 + ent.sum()).backward()
        if direct:
            assert w.grad is None
        else:
            assert w.grad is not None and w.grad.dtype == dtype
            main.add_(w.grad)  # megatron DDP's hook: param.main_grad.add_(param.grad.data)
        outs.append((lp.detach(), ent.detach(), h.grad, main))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(outs[1][3], held)


def test_input_errors() -> None:
    h, w, y = torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"targets has shape \(3,\); expected the hidden states' leading shape"):
        fused_logprobs_entropy(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight has shape \(4, 5\) and hidden \(2, 4\)"):
        fused_logprobs_entropy(h, w.t(), y)
    with pytest.raises(ValueError, match="hidden is torch.bfloat16 and weight torch.float32"):
        fused_logprobs_entropy(h.bfloat16(), w, y)
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
        fused_logprobs_entropy(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_chunk_size=0 must be a positive number"):
        fused_logprobs_entropy(h, w, y, vocab_chunk_size=0)
    with pytest.raises(ValueError, match=r"main_grad has shape \(4, 5\) and weight \(5, 4\)"):
        fused_logprobs_entropy(h, w, y, main_grad=torch.zeros(4, 5))
