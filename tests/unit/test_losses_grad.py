"""Gradient properties of NSR on a random batch, and NSR's mean gradient against the decay ablation."""

from __future__ import annotations

import torch

from nsr_megatron.losses import PolicyLossConfig, policy_loss, rescue_probability

B, T = 16, 24


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3.0
    return {
        "logprobs": old + torch.randn(B, T, generator=g) * 0.3,  # ratios spread well past both boundaries
        "old_logprobs": old,
        "advantages": torch.randn(B, generator=g),
        "mask": (torch.rand(B, T, generator=g) < 0.85).float(),
    }


def grad_of(cfg: PolicyLossConfig, data: dict[str, torch.Tensor], step: int = 0) -> torch.Tensor:
    lp = data["logprobs"].clone().requires_grad_()
    loss, _ = policy_loss(
        cfg,
        lp,
        data["old_logprobs"],
        data["advantages"],
        data["mask"],
        sample_ids=torch.arange(B) + 100,
        step=step,
    )
    loss.backward()
    assert lp.grad is not None
    return lp.grad


def clipped_sets(data: dict[str, torch.Tensor], cfg: PolicyLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.exp(data["logprobs"] - data["old_logprobs"])
    a = data["advantages"][:, None]
    valid = data["mask"] > 0
    upper = (a > 0) & (r > 1 + cfg.eps_high) & valid
    lower = (a < 0) & (r < 1 - cfg.eps_low) & valid
    return upper, lower


def test_clipped_tokens_get_exactly_zero_and_rescued_exactly_the_unclipped_gradient() -> None:
    data = batch()
    cfg = PolicyLossConfig(name="nsr", sigma=0.3)
    upper, lower = clipped_sets(data, cfg)
    clipped = upper | lower
    unclipped = grad_of(PolicyLossConfig(name="dapo", eps_low=1.0, eps_high=1e9), data)  # never clips
    nsr = grad_of(cfg, data, step=3)
    rescued = clipped & (nsr != 0)
    kept = clipped & (nsr == 0)
    assert rescued.sum() >= 5 and kept.sum() >= 5  # the batch exercises both outcomes
    assert torch.equal(nsr[rescued], unclipped[rescued])
    assert torch.equal(nsr[~clipped], unclipped[~clipped])
    dapo = grad_of(PolicyLossConfig(name="dapo"), data)
    assert torch.equal(dapo[clipped], torch.zeros_like(dapo[clipped]))
    assert torch.equal(dapo[~clipped], unclipped[~clipped])


def test_nsr_decay_gradient_is_p_times_unclipped() -> None:
    data = batch(1)
    cfg = PolicyLossConfig(name="nsr-decay", sigma=0.3)
    upper, lower = clipped_sets(data, cfg)
    r = torch.exp(data["logprobs"] - data["old_logprobs"]).double()
    p = torch.zeros(B, T, dtype=torch.float64)
    p[upper | lower] = rescue_probability(cfg, r[upper | lower], upper[upper | lower])
    assert ((p > 0) & (p < 1)).sum() >= 10
    unclipped = grad_of(PolicyLossConfig(name="dapo", eps_low=1.0, eps_high=1e9), data).double()
    decay = grad_of(cfg, data).double()
    want = torch.where(upper | lower, p * unclipped, unclipped)
    torch.testing.assert_close(decay, want, rtol=1e-6, atol=0.0)


def test_mean_nsr_gradient_over_steps_matches_nsr_decay() -> None:
    """Per clipped token, the NSR gradient is g * Bernoulli(p) with g the unclipped gradient, so the mean
    over n steps is g * k / n with k ~ Binomial(n, p): |mean - p g| <= 5 * |g| * sqrt(p (1 - p) / n) holds
    with probability 1 - 6e-7 per token (5 sigma, normal approximation; n p (1 - p) >= 10 is required
    below). With ~100 tokens the test fails spuriously with probability < 1e-4."""
    data = batch(2)
    profiles = [
        PolicyLossConfig(name="nsr", sigma=0.3),
        PolicyLossConfig(name="nsr", profile="linear", delta=0.4),
    ]
    n = 400
    for cfg in profiles:
        decay_cfg = PolicyLossConfig(
            name="nsr-decay", profile=cfg.profile, sigma=cfg.sigma, delta=cfg.delta, p0=cfg.p0
        )
        unclipped = grad_of(PolicyLossConfig(name="dapo", eps_low=1.0, eps_high=1e9), data).double()
        decay = grad_of(decay_cfg, data).double()
        p = torch.where(
            unclipped != 0, decay / unclipped, torch.zeros_like(decay)
        )  # p on clipped, 1 elsewhere
        total = torch.zeros(B, T, dtype=torch.float64)
        for step in range(n):
            total += grad_of(cfg, data, step=step).double()
        mean = total / n
        tested = (p > 0) & (n * p * (1 - p) >= 10)
        assert tested.sum() >= 20, cfg.profile
        bound = 5 * unclipped.abs() * torch.sqrt(p * (1 - p) / n)
        assert ((mean - decay).abs() <= bound)[tested].all(), cfg.profile
        # tokens with p = 0 are never rescued and tokens not clipped always flow: exact
        assert torch.equal(mean[p == 0], decay[p == 0])
