"""Vocab-parallel log-prob + entropy op on one process: exact against log_softmax, gradcheck, chunking."""

from __future__ import annotations

import pytest
import torch

from nsr_megatron.losses import vocab_parallel_logprobs_entropy


def reference(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(
        logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1
    )
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_gradcheck_float64_both_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=g)
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_logprobs_entropy(z, y, temperature=0.7, chunk_size=4), (z,)
    )
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_logprobs_entropy(z, y, chunk_size=1)[1], (z,))
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_logprobs_entropy(z, y)[0], (z,))


@pytest.mark.parametrize(
    ("dtype", "temperature"), [(torch.float32, 1.0), (torch.float32, 0.6), (torch.bfloat16, 1.2)]
)
def test_matches_full_vocab_fp32_log_softmax(dtype: torch.dtype, temperature: float) -> None:
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(3, 11, 257, generator=g) * 4).to(dtype).requires_grad_()
    y = torch.randint(0, 257, (3, 11), generator=g)
    w1, w2 = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    lp, ent = vocab_parallel_logprobs_entropy(z, y, temperature=temperature, chunk_size=5)
    assert lp.shape == ent.shape == (3, 11) and lp.dtype == torch.float32
    (lp * w1 + ent * w2).sum().backward()
    got = z.grad
    # ground truth: float64 log_softmax of the same (rounded) logits
    z64 = z.detach().double().requires_grad_()
    lp_ref, ent_ref = reference(z64, y, temperature)
    (lp_ref * w1.double() + ent_ref * w2.double()).sum().backward()
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-6, atol=2e-6)
    assert got is not None and got.dtype == dtype
    if dtype == torch.float32:  # fp32 rounding of terms like p * (x - logZ + H) with |x| up to ~40
        torch.testing.assert_close(got.double(), z64.grad, rtol=1e-5, atol=4e-6)
    else:  # the gradient is rounded to bf16 (8 bits of mantissa)
        torch.testing.assert_close(got.double(), z64.grad, rtol=8e-3, atol=1e-5)


def test_chunk_size_does_not_change_the_result() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(37, 64, generator=g)
    y = torch.randint(0, 64, (37,), generator=g)
    outs = [vocab_parallel_logprobs_entropy(z, y, chunk_size=c) for c in (1, 7, 37, 1000)]
    for lp, ent in outs[1:]:
        assert torch.equal(lp, outs[0][0]) and torch.equal(ent, outs[0][1])


def test_entropy_is_accurate_for_peaked_distributions() -> None:
    z = torch.zeros(2, 1000)
    z[:, 0] = 30.0  # p(0) = 1 - 9e-11: entropy 2.9e-9
    lp, ent = vocab_parallel_logprobs_entropy(z, torch.tensor([0, 1]))
    ref_lp, ref_ent = reference(z.double(), torch.tensor([0, 1]), 1.0)
    # logZ - E[x] unshifted would cancel 30 - 30 with error ~ 30 * 6e-8 = 2e-6; the shifted form keeps
    # the error at fp32's resolution of log(s) near 1 (~1e-10), as fp32 log_softmax itself
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0.0, atol=2e-10)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-6, atol=1e-6)


def test_input_errors() -> None:
    z, y = torch.zeros(2, 5), torch.zeros(3, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"targets has shape \(3,\); expected the logits' leading shape \(2,\)"
    ):
        vocab_parallel_logprobs_entropy(z, y)
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
        vocab_parallel_logprobs_entropy(z, y[:2], temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive number of tokens"):
        vocab_parallel_logprobs_entropy(z, y[:2], chunk_size=0)


def test_sliced_3d_logits_are_used_in_place_and_match() -> None:
    g = torch.Generator().manual_seed(3)
    full = torch.randn(3, 9, 40, generator=g, requires_grad=True)  # [B, S, V]
    y = torch.randint(0, 40, (3, 8), generator=g)
    w = torch.randn(3, 8, generator=g)
    lp, ent = vocab_parallel_logprobs_entropy(full[:, :-1], y, chunk_size=3)  # a non-contiguous view
    (lp * w + ent).sum().backward()
    got = full.grad
    full.grad = None
    lp_ref, ent_ref = reference(full[:, :-1], y, 1.0)
    (lp_ref * w + ent_ref).sum().backward()
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(ent, ent_ref)
    torch.testing.assert_close(got, full.grad)
    assert got is not None and torch.equal(got[:, -1], torch.zeros(3, 40))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_whole_row_blocks_equal_row_pieces(temperature: float) -> None:
    """A [B, S, V] slice is walked in blocks of whole rows when a row fits in a chunk, in pieces of one row
    otherwise; values and gradients are the same either way, bit for bit."""
    g = torch.Generator().manual_seed(4)
    full = torch.randn(13, 10, 48, generator=g, requires_grad=True)  # [B, S, V]
    y = torch.randint(0, 48, (13, 9), generator=g)
    w = torch.randn(13, 9, generator=g)
    results = []
    for chunk in (4, 9, 20, 1000):  # pieces of rows, one row per block, 2 rows per block, all rows at once
        full.grad = None
        lp, ent = vocab_parallel_logprobs_entropy(full[:, :-1], y, temperature=temperature, chunk_size=chunk)
        (lp * w + 0.5 * ent).sum().backward()
        results.append((lp.detach(), ent.detach(), full.grad.clone()))
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            assert torch.equal(a, b)
