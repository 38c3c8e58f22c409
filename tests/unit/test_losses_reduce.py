"""Reduction helpers on one process, and micro-batch invariance of the loss with global denominators."""

from __future__ import annotations

import pytest
import torch

from nsr_megatron.losses import (
    PolicyLossConfig,
    global_statistics,
    global_sums,
    loss_denominators,
    policy_loss,
    seq_sum_fn,
    summarize_metrics,
)


def test_global_sums_adds_micro_batches_and_fills_missing_keys() -> None:
    a = {"tokens": torch.tensor(3.0), "x_sum": torch.tensor(1.5)}
    b = {"tokens": torch.tensor(2.0, dtype=torch.float64), "y_sum": torch.tensor(4.0)}
    out = global_sums([a, b])
    assert list(out) == ["tokens", "x_sum", "y_sum"]
    assert [v.item() for v in out.values()] == [5.0, 1.5, 4.0]
    assert all(v.dtype == torch.float64 for v in out.values())
    assert global_sums(a)["tokens"].item() == 3.0 and global_sums([]) == {}
    assert seq_sum_fn(None) is None


def test_summarize_metrics_fractions() -> None:
    sums = {
        "tokens": 200.0,
        "seqs": 4.0,
        "clip/upper_sum": 10.0,
        "clip/lower_sum": 30.0,
        "band/upper_sum": 6.0,
        "band/lower_sum": 14.0,
        "rescue/upper_sum": 2.0,
        "rescue/lower_sum": 8.0,
        "rescue/p_sum": 9.0,
        "rescue/grad_mass_sum": 5.0,
        "clip/grad_mass_sum": 100.0,
        "ratio/abs_dev_sum": 20.0,
        "kl_old_sum": 2.0,
        "entropy_sum": 300.0,
        "ratio_hist/upper/+0.25_sum": 50.0,
        "seq/clip/upper_sum": 1.0,
        "seq/clip/lower_sum": 2.0,
    }
    s = summarize_metrics({k: torch.tensor(v) for k, v in sums.items()})
    assert s["clip_frac/upper"] == 0.05 and s["clip_frac/lower"] == 0.15 and s["clip_frac"] == 0.2
    assert s["band_frac"] == 0.1 and s["rescue_frac"] == 0.05 and s["rescue_frac_of_clipped"] == 0.25
    assert s["rescue/expected_frac"] == 0.045 and s["rescue/grad_mass"] == 0.05
    assert s["ratio/mean_abs_dev"] == 0.1 and s["kl_old"] == 0.01 and s["entropy"] == 1.5
    assert s["ratio_hist/upper/+0.25"] == 0.25
    assert s["seq/clip_frac/upper"] == 0.25 and s["seq/clip_frac"] == 0.75
    assert global_statistics({k: torch.tensor(v) for k, v in sums.items()}) == s


def test_micro_batches_with_global_denominators_equal_one_batch() -> None:
    g = torch.Generator().manual_seed(0)
    b, t = 12, 10
    old = -torch.rand(b, t, generator=g)
    lp_full = old + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) < 0.8).float()
    ids = torch.arange(b) * 3
    for name, extra in (
        ("nsr", {"sigma": 0.3}),
        ("grpo", {}),
        ("nsr-decay", {"aggregation": "seq-mean-token-sum"}),
    ):
        cfg = PolicyLossConfig(name=name, **extra)  # type: ignore[arg-type]
        lp = lp_full.clone().requires_grad_()
        ref_loss, ref_sums = policy_loss(cfg, lp, old, adv, mask, sample_ids=ids, step=2)
        ref_loss.backward()
        parts = [torch.arange(0, 5), torch.arange(5, 7), torch.arange(7, 12)]
        den = global_sums([loss_denominators(cfg, mask[p]) for p in parts])
        lp2 = lp_full.clone().requires_grad_()
        total, sums = torch.zeros(()), list[dict[str, torch.Tensor]]()
        for p in parts:
            loss, s = policy_loss(
                cfg, lp2[p], old[p], adv[p], mask[p], sample_ids=ids[p], step=2,
                global_num_tokens=den["tokens"], global_num_seqs=den["seqs"],
            )  # fmt: skip
            loss.backward()
            total, sums = total + loss.detach(), [*sums, s]
        torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(lp2.grad, lp.grad, rtol=1e-6, atol=1e-9)
        assert summarize_metrics(global_sums(sums)) == pytest.approx(summarize_metrics(global_sums(ref_sums)))
