"""NSR's competitors (SAPO, Clip-Cov, KL-Cov, IcePop) against from-the-formula float64 references.

Each reference is written here from the paper's equation, token by token in plain Python loops over 0-dim
tensors, and differentiated by autograd: it shares no code with :func:`policy_loss` but the project's RNG
(Clip-Cov's random choice is, by definition, the counter-based draw of (seed, step, sample id, token index)).
Inputs: a few sequences with masked tokens, advantages of both signs, log-ratios spread over [-1.2, 1.2] so that
ratios fall inside and outside every bound; loss values and gradients d loss / d logprobs must agree.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import pytest
import torch

from nsr_megatron.losses import PolicyLossConfig, loss_denominators, policy_loss, summarize_metrics, uniform

F64 = torch.float64
B, T = 6, 7
ADV = [1.3, -0.7, 0.4, -1.8, 2.1, -0.2]  # both signs, per sequence
RTOL, ATOL = 1e-12, 1e-14


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float64 inputs: old in [-3, 0], log-ratio in [-1.2, 1.2], a ragged mask, an empty-ish row."""
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(B, T, generator=g, dtype=F64)
    logratio = (torch.rand(B, T, generator=g, dtype=F64) * 2.0 - 1.0) * 1.2
    mask = (torch.rand(B, T, generator=g, dtype=F64) < 0.8).to(F64)
    mask[:, 0] = 1.0  # every sequence has a token
    mask[2, 3:] = 0.0  # a short one
    rollout = old + (torch.rand(B, T, generator=g, dtype=F64) * 2.0 - 1.0) * 2.2  # k = exp(old - rollout)
    return {
        "logprobs": old + logratio,
        "old_logprobs": old,
        "advantages": torch.tensor(ADV, dtype=F64),
        "mask": mask,
        "rollout_logprobs": rollout,
        "sample_ids": 100 + 3 * torch.arange(B),
    }


def run(cfg: PolicyLossConfig, data: dict[str, torch.Tensor], **kwargs: Any) -> tuple[
    torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]
]:
    """(loss, d loss / d logprobs, sums, masks) of :func:`policy_loss`."""
    lp = data["logprobs"].clone().requires_grad_()
    masks: dict[str, torch.Tensor] = {}
    kwargs.setdefault("sample_ids", data["sample_ids"])
    kwargs.setdefault("step", 5)
    loss, sums = policy_loss(
        cfg, lp, data["old_logprobs"], data["advantages"], data["mask"], masks=masks, **kwargs
    )
    loss.backward()
    assert lp.grad is not None
    return loss.detach(), lp.grad, sums, masks


def reference_grad(fn: Any, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, d value / d logprobs) of a reference loss ``fn(logprobs)`` written with Python loops."""
    lp = data["logprobs"].clone().requires_grad_()
    value = fn(lp)
    value.backward()
    assert lp.grad is not None
    return value.detach(), lp.grad


def valid_tokens(data: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    return [(i, t) for i in range(B) for t in range(T) if data["mask"][i, t] > 0]


def assert_matches(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[1], want[1], rtol=RTOL, atol=ATOL)


# ---- SAPO (arXiv 2511.20347) ------------------------------------------------------------------------------
# J = 1/G sum_i 1/|y_i| sum_t f(r_it) A_i, f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos if A > 0 else tau_neg


def sapo_reference(data: dict[str, torch.Tensor], tau_pos: float, tau_neg: float) -> Any:
    def loss(lp: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=F64)
        for i in range(B):
            tokens = [t for t in range(T) if data["mask"][i, t] > 0]
            a = float(data["advantages"][i])
            tau = tau_pos if a > 0 else tau_neg
            seq = torch.zeros((), dtype=F64)
            for t in tokens:
                r = torch.exp(lp[i, t] - data["old_logprobs"][i, t])
                seq = seq + torch.sigmoid(tau * (r - 1.0)) * (4.0 / tau) * a
            total = total + seq / len(tokens)
        return -total / B

    return loss


@pytest.mark.parametrize(("tau_pos", "tau_neg"), [(1.0, 1.05), (0.5, 3.0)])
def test_sapo_matches_the_papers_objective(tau_pos: float, tau_neg: float) -> None:
    data = make_batch(1)
    overrides = {} if (tau_pos, tau_neg) == (1.0, 1.05) else {"tau_pos": tau_pos, "tau_neg": tau_neg}
    cfg = PolicyLossConfig(name="sapo", **overrides)  # type: ignore[arg-type]
    assert (cfg.tau_pos, cfg.tau_neg, cfg.aggregation) == (tau_pos, tau_neg, "seq-mean-token-mean")
    loss, grad, sums, masks = run(cfg, data)
    assert_matches((loss, grad), reference_grad(sapo_reference(data, tau_pos, tau_neg), data))
    r = torch.exp(data["logprobs"] - data["old_logprobs"])[data["mask"] > 0]
    assert (r > 1.28).any() and (r < 0.8).any()  # a hard clip would have dropped some of these
    assert grad[data["mask"] > 0].ne(0).all() and grad[data["mask"] == 0].eq(0).all()  # SAPO drops no token
    assert not masks["clipped"].any() and sums["clip/upper_sum"] == 0
    stats = summarize_metrics(sums)
    assert 0.0 < stats["sapo/grad_weight_mean"] < 1.0


def test_sapo_gradient_weight_is_the_gate_derivative() -> None:
    # one token per ratio: d loss / d logp = -A f'(r) r with f'(r) = 4 s (1 - s), s = sigmoid(tau (r - 1))
    ratios = [0.5, 1.0, 1.5, 3.0]
    lp = torch.tensor([[math.log(x)] for x in ratios], dtype=F64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=F64)
    loss, _ = policy_loss(PolicyLossConfig(name="sapo"), lp, torch.zeros_like(lp), adv, torch.ones_like(lp))
    loss.backward()
    assert lp.grad is not None
    for k, (x, a) in enumerate(zip(ratios, adv.tolist(), strict=True)):
        tau = 1.0 if a > 0 else 1.05
        s = 1.0 / (1.0 + math.exp(-tau * (x - 1.0)))
        assert lp.grad[k, 0].item() == pytest.approx(-a * 4.0 * s * (1.0 - s) * x / 4, rel=1e-12)
    assert lp.grad[1, 0].item() == pytest.approx(-1.0 / 4, rel=1e-12)  # r = 1: the unclipped gradient


# ---- Clip-Cov (Cui et al. 2025, arXiv 2505.22617) ---------------------------------------------------------
# Cov_t = (A_t - mean A) (logp_t - mean logp) over the N valid tokens; I = a uniformly random choice of
# max(floor(ratio N), 1) tokens among those not clipped by PPO with lb < Cov_t < ub; L = 1/N sum_t
# [t not in I] max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)). The random choice is the n smallest draws.


def covariances(data: dict[str, torch.Tensor]) -> dict[tuple[int, int], float]:
    toks = valid_tokens(data)
    advs = [float(data["advantages"][i]) for i, _ in toks]
    logps = [float(data["logprobs"][i, t]) for i, t in toks]
    a_bar, l_bar = sum(advs) / len(toks), sum(logps) / len(toks)
    return {tok: (a - a_bar) * (lp - l_bar) for tok, a, lp in zip(toks, advs, logps, strict=True)}


def ppo_clipped(a: float, r: float, lo: float, hi: float) -> bool:
    """PPO would drop the token: -A clip(r) > -A r."""
    return -a * min(max(r, lo), hi) > -a * r


def clip_cov_choice(
    data: dict[str, torch.Tensor], cfg: PolicyLossConfig, seed: int, step: int, offset: int = 0
) -> set[tuple[int, int]]:
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    cov = covariances(data)
    band = [
        (i, t)
        for (i, t), c in cov.items()
        if cfg.clip_cov_lb < c < cfg.clip_cov_ub
        and not ppo_clipped(
            float(data["advantages"][i]), math.exp(float(data["logprobs"][i, t] - data["old_logprobs"][i, t])), lo, hi
        )
    ]
    n = min(max(math.floor(cfg.clip_cov_ratio * len(cov)), 1), len(band))
    draws = {(i, t): uniform(seed, step, data["sample_ids"][i : i + 1], t + offset).item() for i, t in band}
    return set(sorted(band, key=lambda tok: draws[tok])[:n])


def clip_cov_reference(data: dict[str, torch.Tensor], cfg: PolicyLossConfig, chosen: set[tuple[int, int]]) -> Any:
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high

    def loss(lp: torch.Tensor) -> torch.Tensor:
        toks = valid_tokens(data)
        total = torch.zeros((), dtype=F64)
        for i, t in toks:
            if (i, t) in chosen:
                continue  # detached: contributes 0 (and no gradient), stays in the denominator
            a = data["advantages"][i]
            r = torch.exp(lp[i, t] - data["old_logprobs"][i, t])
            total = total + torch.maximum(-a * r, -a * torch.clamp(r, lo, hi))
        return total / len(toks)

    return loss


@pytest.mark.parametrize(
    "overrides",
    [
        {"clip_cov_ratio": 0.25, "clip_cov_lb": 0.0, "clip_cov_ub": 3.0},  # the authors' eps 1 / 1
        {"clip_cov_ratio": 0.06, "clip_cov_lb": -1.0, "clip_cov_ub": 1.0, "eps_low": 0.2, "eps_high": 0.28},
        {},  # the defaults: ratio 2e-4 -> one token, band (1, 5)
    ],
)
def test_clip_cov_matches_the_papers_objective(overrides: dict[str, float]) -> None:
    data = make_batch(2)
    data["advantages"] = data["advantages"] * 2.0  # covariances up to ~4, some in the default band (1, 5)
    cfg = PolicyLossConfig(name="clip-cov", seed=7, **overrides)  # type: ignore[arg-type]
    chosen = clip_cov_choice(data, cfg, seed=7, step=5)
    assert chosen  # the case exercises the detach
    loss, grad, sums, masks = run(cfg, data)
    assert_matches((loss, grad), reference_grad(clip_cov_reference(data, cfg, chosen), data))
    assert {tuple(x) for x in masks["cov"].nonzero().tolist()} == chosen
    assert all(grad[i, t] == 0 for i, t in chosen)
    assert sums["cov/selected_sum"] == len(chosen)
    if "eps_high" in overrides:  # both clip sides present and excluded from the band
        assert sums["clip/upper_sum"] > 0 and sums["clip/lower_sum"] > 0
        assert not (masks["cov"] & masks["clipped"]).any()


def test_clip_cov_selection_follows_seed_step_and_token_index() -> None:
    data = make_batch(3)
    cfg = PolicyLossConfig(name="clip-cov", clip_cov_ratio=0.15, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    picks = {}
    for seed, step in ((0, 5), (1, 5), (0, 6)):
        c = PolicyLossConfig(**{**cfg.__dict__, "seed": seed})
        _, _, _, masks = run(c, data, step=step)
        again = run(c, data, step=step)[3]["cov"]
        assert torch.equal(masks["cov"], again)  # the same seed and step reproduce the choice
        assert {tuple(x) for x in masks["cov"].nonzero().tolist()} == clip_cov_choice(data, c, seed, step)
        picks[seed, step] = masks["cov"]
        n = len(valid_tokens(data))
        assert int(masks["cov"].sum()) == math.floor(0.15 * n)
    assert not torch.equal(picks[0, 5], picks[1, 5])  # another seed, another choice
    assert not torch.equal(picks[0, 5], picks[0, 6])  # another step, another choice
    # the draw hashes the token's index in its response, not its column
    offset = torch.arange(T).expand(B, T) + 4
    shifted = run(cfg, data, token_index=offset)[3]["cov"]
    assert {tuple(x) for x in shifted.nonzero().tolist()} == clip_cov_choice(data, cfg, 0, 5, offset=4)


def test_clip_cov_needs_sample_ids_and_step() -> None:
    data = make_batch(0)
    with pytest.raises(ValueError, match=re.escape("cov='clip' (Clip-Cov) needs sample_ids [B] (int64) and step")):
        policy_loss(
            PolicyLossConfig(name="clip-cov"), data["logprobs"], data["old_logprobs"], data["advantages"], data["mask"]
        )


# ---- KL-Cov -----------------------------------------------------------------------------------------------
# I = the max(floor(k N), 1) tokens of largest Cov_t; L = 1/N sum_t (-A r + [t in I] beta |log r|) (no clip)


def kl_cov_reference(data: dict[str, torch.Tensor], ratio: float, beta: float) -> tuple[Any, set[tuple[int, int]]]:
    cov = covariances(data)
    n = max(math.floor(len(cov) * ratio), 1)
    chosen = set(sorted(cov, key=lambda tok: -cov[tok])[:n])

    def loss(lp: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=F64)
        for i, t in cov:
            log_r = lp[i, t] - data["old_logprobs"][i, t]
            total = total - data["advantages"][i] * torch.exp(log_r)
            if (i, t) in chosen:
                total = total + beta * torch.abs(log_r)
        return total / len(cov)

    return loss, chosen


@pytest.mark.parametrize(("ratio", "beta"), [(2e-4, 1.0), (0.2, 1.0), (0.3, 0.1)])
def test_kl_cov_matches_the_papers_objective(ratio: float, beta: float) -> None:
    data = make_batch(4)
    overrides = {} if (ratio, beta) == (2e-4, 1.0) else {"kl_cov_ratio": ratio, "kl_cov_coef": beta}
    cfg = PolicyLossConfig(name="kl-cov", **overrides)  # type: ignore[arg-type]
    ref, chosen = kl_cov_reference(data, ratio, beta)
    loss, grad, sums, masks = run(cfg, data, sample_ids=None, step=None)  # KL-Cov draws nothing
    assert_matches((loss, grad), reference_grad(ref, data))
    assert {tuple(x) for x in masks["cov"].nonzero().tolist()} == chosen
    assert sums["clip/upper_sum"] == 0 and sums["clip/lower_sum"] == 0  # no clip at all


# ---- IcePop (Ring-1T, arXiv 2510.18855) -------------------------------------------------------------------
# J = 1/G sum_i 1/|y_i| sum_t M(k_it) min(r A, clip(r, 1 - eps, 1 + eps) A), k = pi_train(old) / pi_infer,
# M(k) = k on [alpha, beta], 0 outside; |y_i| counts every response token (masked ones included)


def icepop_reference(data: dict[str, torch.Tensor], alpha: float, beta: float, eps: float) -> Any:
    def loss(lp: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=F64)
        for i in range(B):
            tokens = [t for t in range(T) if data["mask"][i, t] > 0]
            a = data["advantages"][i]
            seq = torch.zeros((), dtype=F64)
            for t in tokens:
                k = math.exp(float(data["old_logprobs"][i, t] - data["rollout_logprobs"][i, t]))
                weight = k if alpha <= k <= beta else 0.0
                r = torch.exp(lp[i, t] - data["old_logprobs"][i, t])
                seq = seq + weight * torch.minimum(r * a, torch.clamp(r, 1 - eps, 1 + eps) * a)
            total = total + seq / len(tokens)
        return -total / B

    return loss


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 5.0), (0.7, 1.5)])
def test_icepop_matches_the_objective(alpha: float, beta: float) -> None:
    data = make_batch(5)
    overrides = {} if (alpha, beta) == (0.5, 5.0) else {"mis_low": alpha, "mis_high": beta, "tis_cap": beta}
    cfg = PolicyLossConfig(name="icepop", **overrides)  # type: ignore[arg-type]
    assert (cfg.mis_low, cfg.mis_high, cfg.mis_mode, cfg.eps_low, cfg.eps_high) == (alpha, beta, "zero", 0.2, 0.2)
    rollout = data["rollout_logprobs"]
    loss, grad, sums, _ = run(cfg, data, rollout_logprobs=rollout)
    assert_matches((loss, grad), reference_grad(icepop_reference(data, alpha, beta, 0.2), data))
    k = torch.exp(data["old_logprobs"] - rollout)[data["mask"] > 0]
    outside = ((k < alpha) | (k > beta)).sum()
    assert 0 < outside < k.numel()  # both cases present
    stats = summarize_metrics(sums)
    assert stats["mis/zeroed_frac"] == pytest.approx(outside.item() / k.numel())
    assert stats["tokens"] == k.numel()  # the zeroed tokens stay in the denominators
    den = loss_denominators(cfg, data["mask"], old_logprobs=data["old_logprobs"], rollout_logprobs=rollout)
    assert den["tokens"] == k.numel() and den["seqs"] == B


def test_icepop_is_mis_with_tis_but_keeps_the_denominators() -> None:
    # The same weights as MIS (drop) + TIS: with token-mean, loss * N_all (icepop) = loss * N_kept (drop).
    data = make_batch(6)
    rollout = data["rollout_logprobs"]
    knobs = {"mis_low": 0.5, "mis_high": 5.0, "tis_cap": 5.0, "aggregation": "token-mean"}
    ice = run(PolicyLossConfig(name="icepop", aggregation="token-mean"), data, rollout_logprobs=rollout)
    drop = run(PolicyLossConfig(name="grpo", **knobs), data, rollout_logprobs=rollout)  # type: ignore[arg-type]
    n_all, n_kept = ice[2]["tokens"], drop[2]["tokens"]
    assert n_kept < n_all
    torch.testing.assert_close(ice[0] * n_all, drop[0] * n_kept, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(ice[1] * n_all, drop[1] * n_kept, rtol=1e-12, atol=1e-15)


# ---- configuration: knobs, warnings, errors ----------------------------------------------------------------


def test_new_presets_defaults() -> None:
    assert PolicyLossConfig(name="sapo").surrogate == "sapo"
    cc = PolicyLossConfig(name="clip-cov")
    assert (cc.cov, cc.clip_cov_ratio, cc.clip_cov_lb, cc.clip_cov_ub, cc.eps_low, cc.eps_high) == (
        "clip", 2e-4, 1.0, 5.0, 1.0, 1.0
    )
    kc = PolicyLossConfig(name="kl-cov")
    assert (kc.surrogate, kc.cov, kc.kl_cov_ratio, kc.kl_cov_coef) == ("unclipped", "kl", 2e-4, 1.0)
    ice = PolicyLossConfig(name="icepop")
    assert (ice.mis_low, ice.mis_high, ice.tis_cap, ice.mis_mode) == (0.5, 5.0, 5.0, "zero")


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("sapo", {"eps_high": 0.3}, "PolicyLossConfig.eps_high=0.3 is ignored by loss 'sapo' (surrogate='sapo' has"),
        ("dapo", {"tau_pos": 2.0}, "PolicyLossConfig.tau_pos=2.0 is ignored by loss 'dapo' (surrogate='clip')"),
        ("kl-cov", {"clip_cov_ratio": 0.1}, "PolicyLossConfig.clip_cov_ratio=0.1 is ignored by loss 'kl-cov' (cov="),
        ("clip-cov", {"kl_cov_coef": 0.5}, "PolicyLossConfig.kl_cov_coef=0.5 is ignored by loss 'clip-cov' (cov="),
        ("clip-cov", {"sigma": 0.2}, "PolicyLossConfig.sigma=0.2 is ignored by loss 'clip-cov' (rescue='off')"),
        ("dapo", {"mis_mode": "zero"}, "PolicyLossConfig.mis_mode='zero' is ignored by loss 'dapo' (no MIS bound"),
    ],
)
def test_ignored_knobs_of_the_new_presets_warn(name: str, overrides: dict[str, Any], message: str) -> None:
    with pytest.warns(UserWarning, match=re.escape(message)):
        PolicyLossConfig(name=name, **overrides)


def test_used_knobs_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PolicyLossConfig(name="clip-cov", seed=3, clip_cov_ratio=0.1, eps_high=0.28)  # seed drives the draw
        PolicyLossConfig(name="sapo", tau_pos=0.5, dual_clip=3.0)
        PolicyLossConfig(name="kl-cov", kl_cov_ratio=2e-3, kl_cov_coef=0.1)
        PolicyLossConfig(name="icepop", mis_high=3.0, tis_cap=3.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"name": "sapo", "tau_pos": 0.0},
            "PolicyLossConfig.tau_pos=0.0 must be > 0 (SAPO's gate temperature for A > 0); use e.g. 1.0.",
        ),
        ({"name": "sapo", "tau_neg": -1.0}, "PolicyLossConfig.tau_neg=-1.0 must be > 0"),
        ({"name": "clip-cov", "clip_cov_ratio": 0.0}, "PolicyLossConfig.clip_cov_ratio=0.0 must be in (0, 1]"),
        ({"name": "clip-cov", "clip_cov_lb": 5.0}, "PolicyLossConfig.clip_cov_lb=5.0 must be below clip_cov_ub=5.0"),
        ({"name": "kl-cov", "kl_cov_ratio": 1.5}, "PolicyLossConfig.kl_cov_ratio=1.5 must be in (0, 1]"),
        ({"name": "kl-cov", "kl_cov_coef": -0.1}, "PolicyLossConfig.kl_cov_coef=-0.1 must be >= 0; use e.g. 1.0."),
        ({"name": "cispo", "cov": "kl"}, "PolicyLossConfig.cov='kl' needs surrogate='clip' or 'unclipped'"),
        ({"name": "nsr", "cov": "clip"}, "PolicyLossConfig.rescue='stochastic' cannot be combined with cov='clip'"),
        ({"name": "sapo", "rescue": "decay"}, "PolicyLossConfig.rescue='decay' needs surrogate='clip' (SAPO's soft"),
        ({"name": "icepop", "mis_mode": "keep"}, "PolicyLossConfig.mis_mode='keep' is not one of 'drop', 'zero'"),
    ],
)
def test_new_knobs_validation_messages(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PolicyLossConfig(**overrides)


@pytest.mark.parametrize("name", ["sapo", "icepop"])
def test_sapo_and_icepop_do_not_depend_on_the_micro_batch_split(name: str) -> None:
    # Their terms are per token; with global denominators the summed micro-batch losses equal the whole batch's.
    # (Clip-Cov and KL-Cov choose their tokens within each call, as their reference does: not split-invariant.)
    data = make_batch(7)
    cfg = PolicyLossConfig(name=name)
    rollout = data["rollout_logprobs"]
    whole, grad, _, _ = run(cfg, data, rollout_logprobs=rollout)
    parts = [torch.arange(0, 2), torch.arange(2, 5), torch.arange(5, B)]
    dens = [loss_denominators(cfg, data["mask"][p], old_logprobs=data["old_logprobs"][p], rollout_logprobs=rollout[p])
            for p in parts]  # fmt: skip
    tokens, seqs = sum(d["tokens"] for d in dens), sum(d["seqs"] for d in dens)
    lp = data["logprobs"].clone().requires_grad_()
    total = torch.zeros((), dtype=F64)
    for p in parts:
        loss, _ = policy_loss(
            cfg, lp[p], data["old_logprobs"][p], data["advantages"][p], data["mask"][p],
            rollout_logprobs=rollout[p], global_num_tokens=tokens, global_num_seqs=seqs,
        )  # fmt: skip
        total = total + loss
    total.backward()
    torch.testing.assert_close(total.detach(), whole, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lp.grad, grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["sapo", "clip-cov", "kl-cov", "icepop"])
def test_masked_garbage_does_not_leak(name: str) -> None:
    # float32, -inf / nan at masked positions (old, current and rollout log-probs): finite loss, gradient and sums
    lp = torch.tensor([[0.1, float("-inf"), -0.2], [0.0, float("nan"), -1.0]], requires_grad=True)
    old = torch.tensor([[0.0, float("-inf"), -0.5], [0.3, 3.0, -0.1]])
    rollout = torch.tensor([[0.2, float("nan"), -0.4], [0.0, 1.0, -3.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    cfg = PolicyLossConfig(name=name, clip_cov_lb=-10.0) if name == "clip-cov" else PolicyLossConfig(name=name)
    loss, sums = policy_loss(
        cfg, lp, old, torch.tensor([1.0, -1.0]), mask, sample_ids=torch.arange(2), step=1, rollout_logprobs=rollout
    )
    loss.backward()
    assert torch.isfinite(loss) and lp.grad is not None and torch.isfinite(lp.grad).all()
    assert lp.grad[:, 1].abs().sum() == 0.0
    assert all(torch.isfinite(v) for v in sums.values())
