"""Every preset pinned to hand-computed values (docs/LOSSES.md formulas written out in the comments).

Inputs are built from ratios: old log-prob 0 and log-prob log(r), so r is exact; computed in float64.
Gradients are d loss / d logprob.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from nsr_megatron.losses import PolicyLossConfig, policy_loss, rescue_probability, summarize_metrics, uniform

ATOL = 1e-9  # float64 arithmetic on hand-written decimals


def run(
    cfg: PolicyLossConfig,
    ratios: list[list[float]],
    adv: list[float] | list[list[float]],
    mask: list[list[int]] | None = None,
    **kwargs: Any,
) -> tuple[float, list[list[float]], dict[str, float]]:
    r = torch.tensor(ratios, dtype=torch.float64)
    lp = r.log().requires_grad_()
    m = torch.ones_like(r) if mask is None else torch.tensor(mask, dtype=torch.float64)
    kwargs.setdefault("sample_ids", torch.arange(r.shape[0]))
    kwargs.setdefault("step", 0)
    loss, sums = policy_loss(
        cfg, lp, torch.zeros_like(r), torch.tensor(adv, dtype=torch.float64), m, **kwargs
    )
    loss.backward()
    assert lp.grad is not None
    return loss.item(), lp.grad.tolist(), summarize_metrics(sums)


def close(got: object, want: object) -> None:
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), rtol=0.0, atol=ATOL
    )


# ---- token-level clip: DAPO / GRPO / dual clip -----------------------------------------------------------


def test_dapo_positive_advantage() -> None:
    # A=+1, eps 0.2/0.28: L = max(-r, -clip(r, 0.8, 1.28))
    # r=1.35 -> clipped, L=-1.28, grad 0; r=1.1 -> -1.1; r=0.7 -> max(-0.7, -0.8) = -0.7 (kept); r=0.9 -> -0.9
    # token-mean over 4: (-1.28 - 1.1 - 0.7 - 0.9) / 4 = -0.995; grad -A r / 4
    loss, grad, stats = run(PolicyLossConfig(name="dapo"), [[1.35, 1.1, 0.7, 0.9]], [1.0])
    close(loss, -0.995)
    close(grad, [[0.0, -0.275, -0.175, -0.225]])
    assert stats["clip_frac/upper"] == 0.25 and stats["clip_frac/lower"] == 0.0


def test_dapo_negative_advantage() -> None:
    # A=-1: L = max(r, clip(r)); r=1.35 -> 1.35 (kept, not clipped above for A<0); r=0.7 -> 0.8 (clipped)
    # r=0.85 -> 0.85; r=1.0 -> 1.0. Mean = (1.35 + 0.8 + 0.85 + 1.0) / 4 = 1.0; grad = r / 4 on kept tokens
    loss, grad, stats = run(PolicyLossConfig(name="dapo"), [[1.35, 0.7, 0.85, 1.0]], [-1.0])
    close(loss, 1.0)
    close(grad, [[0.3375, 0.0, 0.2125, 0.25]])
    assert stats["clip_frac/lower"] == 0.25 and stats["clip_frac/upper"] == 0.0


def test_grpo_seq_mean_token_mean_with_ragged_mask() -> None:
    # eps 0.2/0.2. seq0 (A=+1, 2 tokens, 3rd masked): r=1.3 -> -1.2 (clipped), r=1.0 -> -1.0; mean -1.1
    # seq1 (A=-1, 3 tokens): r=0.7 -> 0.8 (clipped), 1.1 -> 1.1, 1.0 -> 1.0; mean 2.9/3
    # loss = (-1.1 + 2.9/3) / 2; grads: -A r / (T_i * 2)
    loss, grad, stats = run(
        PolicyLossConfig(name="grpo"), [[1.3, 1.0, 5.0], [0.7, 1.1, 1.0]], [1.0, -1.0], [[1, 1, 0], [1, 1, 1]]
    )
    close(loss, (-1.1 + 2.9 / 3) / 2)
    close(grad, [[0.0, -0.25, 0.0], [0.0, 1.1 / 6, 1.0 / 6]])
    assert stats["tokens"] == 5 and stats["seqs"] == 2


def test_dual_clip_caps_negative_advantage_loss() -> None:
    # A=-1, c=3: L = min(max(r, clip(r)), 3): r=4 -> 3 (grad 0), r=2 -> 2 (grad 2/2 = 1)
    loss, grad, stats = run(PolicyLossConfig(name="dapo", dual_clip=3.0), [[4.0, 2.0]], [-1.0])
    close(loss, 2.5)
    close(grad, [[0.0, 1.0]])
    assert stats["clip_frac/dual"] == 0.5


def test_seq_mean_token_sum_and_norm() -> None:
    # A=+1, dapo eps; seq0 r=[1.0, 1.1], seq1 r=[0.9] (2nd masked). sums: -2.1 and -0.9
    ratios, mask = [[1.0, 1.1], [0.9, 1.0]], [[1, 1], [1, 0]]
    loss, grad, _ = run(
        PolicyLossConfig(name="dapo", aggregation="seq-mean-token-sum"), ratios, [1.0, 1.0], mask
    )
    close(loss, -3.0 / 2)  # sum over tokens / number of sequences
    close(grad, [[-0.5, -0.55], [-0.45, 0.0]])
    cfg = PolicyLossConfig(name="dapo", aggregation="seq-mean-token-sum-norm", max_length=4)
    loss, grad, _ = run(cfg, ratios, [1.0, 1.0], mask)
    close(loss, -3.0 / (2 * 4))  # Dr.GRPO: / (max_length * sequences)
    close(grad, [[-1.0 / 8, -1.1 / 8], [-0.9 / 8, 0.0]])


# ---- sequence level: GSPO / GSPO-token ------------------------------------------------------------------


def test_gspo_sequence_ratio_clip() -> None:
    # eps 3e-4 / 4e-4, s_i = exp(mean_t log r).
    # seq0 mean 0.001 -> s=e^0.001 > 1.0004, A=+1: clipped, L=-1.0004
    # seq1 mean 1e-4 -> s = e^1e-4 inside: L = -s, grad per token -s / (3 tokens * 3 seqs)
    # seq2 mean -0.001 -> s < 0.9997, A=-1: clipped, L = +0.9997
    lr = [[0.0005, 0.0015, 0.001], [0.0001, -0.0001, 0.0003], [-0.002, 0.0, -0.001]]
    ratios = [[math.exp(x) for x in row] for row in lr]
    loss, grad, stats = run(PolicyLossConfig(name="gspo"), ratios, [1.0, 1.0, -1.0])
    s1 = math.exp(1e-4)
    close(loss, (-1.0004 - s1 + 0.9997) / 3)
    close(grad, [[0.0] * 3, [-s1 / 9] * 3, [0.0] * 3])
    assert stats["seq/clip_frac/upper"] == pytest.approx(1 / 3) and stats[
        "seq/clip_frac/lower"
    ] == pytest.approx(1 / 3)


def test_gspo_gradient_equals_autograd_of_the_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(4, 5, generator=g, dtype=torch.float64) * 1e-3
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64
    )
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    cfg = PolicyLossConfig(name="gspo")
    lp = lr.clone().requires_grad_()
    loss, _ = policy_loss(cfg, lp, torch.zeros_like(lr), adv, mask)
    loss.backward()
    direct = lr.clone().requires_grad_()
    s = torch.exp((direct * mask).sum(1) / mask.sum(1))  # GSPO sequence ratio with gradient through the mean
    per_seq = torch.maximum(-adv * s, -adv * s.clamp(1 - 3e-4, 1 + 4e-4))
    per_seq.mean().backward()
    torch.testing.assert_close(loss, per_seq.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(lp.grad, direct.grad, rtol=1e-10, atol=1e-14)


def test_gspo_token_accepts_per_token_advantages_and_gspo_refuses_them() -> None:
    ratios = [[1.0001, 1.0001]]
    loss, grad, _ = run(PolicyLossConfig(name="gspo-token"), ratios, [[1.0, 2.0]])
    s = 1.0001  # one sequence: seq-mean-token-mean = mean over its tokens of -A_t s
    close(loss, -(1.0 + 2.0) * s / 2)
    close(grad, [[-s / 2, -2 * s / 2]])
    with pytest.raises(ValueError, match=r"pass advantages of shape \[B\], or use name='gspo-token'"):
        run(PolicyLossConfig(name="gspo"), ratios, [[1.0, 2.0]])


# ---- CISPO -----------------------------------------------------------------------------------------------


def test_cispo() -> None:
    # L = -sg(clip(r, 1 - 1.0, 1.28)) * A * logp; r=1.5, A=+1: -1.28 * log 1.5, grad -1.28
    # r=0.5, A=-1: weight 0.5 (no lower clip): -0.5 * (-1) * log 0.5, grad +0.5. token-mean over 2
    loss, grad, stats = run(PolicyLossConfig(name="cispo"), [[1.5], [0.5]], [1.0, -1.0])
    close(loss, (-1.28 * math.log(1.5) + 0.5 * math.log(0.5)) / 2)
    close(grad, [[-1.28 / 2], [0.5 / 2]])
    assert stats["clip_frac/upper"] == 0.5


# ---- NSR -------------------------------------------------------------------------------------------------

# upper boundary 1.28, lower 0.8; relative overshoot d = r / 1.28 - 1 above, 1 - r / 0.8 below
R_UP_IN, R_UP_OUT = 1.28 * 1.05, 1.28 * 1.2  # d = 0.05 (inside delta = 0.1), 0.2 (outside)
R_LO_IN, R_LO_OUT = 0.8 * 0.95, 0.8 * 0.8


def test_rescue_probability_profiles_by_hand() -> None:
    nsr = PolicyLossConfig(name="nsr")  # noise, sigma 0.1
    r = torch.tensor([1.3, 1.28, 1.28 / 0.9, 1.5, 0.76, 0.8, 0.8 / 1.1], dtype=torch.float64)
    up = torch.tensor([True, True, True, True, False, False, False])
    # upper: ((1.28 / r) - 0.9) / 0.2 -> 1.3: 0.4230769..., boundary 1/2, 1.28/0.9: 0, beyond: 0
    # lower: (1.1 - 0.8 / r) / 0.2 -> 0.76: 0.2368421..., boundary 1/2, 0.8/1.1: 0
    want = [(1.28 / 1.3 - 0.9) / 0.2, 0.5, 0.0, 0.0, (1.1 - 0.8 / 0.76) / 0.2, 0.5, 0.0]
    close(rescue_probability(nsr, r, up).tolist(), want)
    r2 = torch.tensor([R_UP_IN, R_UP_OUT, R_LO_IN, R_LO_OUT], dtype=torch.float64)
    up2 = torch.tensor([True, True, False, False])
    const = PolicyLossConfig(name="nsr", profile="constant", p0=0.7, delta=0.1)
    close(rescue_probability(const, r2, up2).tolist(), [0.7, 0.0, 0.7, 0.0])
    linear = PolicyLossConfig(name="nsr", profile="linear", p0=0.5, delta=0.1)
    close(rescue_probability(linear, r2, up2).tolist(), [0.25, 0.0, 0.25, 0.0])  # 0.5 * (1 - 0.05 / 0.1)
    widen = PolicyLossConfig(name="nsr-widen", delta=0.1)
    close(rescue_probability(widen, r2, up2).tolist(), [1.0, 0.0, 1.0, 0.0])


def test_nsr_constant_p1_rescues_band_tokens_on_both_sides() -> None:
    # p = 1 inside the band: rescued tokens take the unclipped -A r, the rest keep the clip value
    # A=+1: r=1.344 -> -1.344 (rescued), r=1.536 -> -1.28; A=-1: r=0.76 -> +0.76 (rescued), r=0.64 -> 0.8
    cfg = PolicyLossConfig(name="nsr", profile="constant", p0=1.0, delta=0.1)
    ratios, adv = [[R_UP_IN, R_UP_OUT], [R_LO_IN, R_LO_OUT]], [1.0, -1.0]
    loss, grad, stats = run(cfg, ratios, adv)
    close(loss, (-R_UP_IN - 1.28 + R_LO_IN + 0.8) / 4)
    close(grad, [[-R_UP_IN / 4, 0.0], [R_LO_IN / 4, 0.0]])
    assert (
        stats["rescue_frac"] == 0.5 and stats["rescue_frac_of_clipped"] == 0.5 and stats["band_frac"] == 0.5
    )
    assert stats["rescue/grad_mass"] == pytest.approx(
        (R_UP_IN + R_LO_IN) / (R_UP_IN + R_UP_OUT + R_LO_IN + R_LO_OUT)
    )
    # sides='upper': only the upper token is rescued
    loss, grad, _ = run(PolicyLossConfig(name="nsr", profile="constant", p0=1.0, sides="upper"), ratios, adv)
    close(loss, (-R_UP_IN - 1.28 + 0.8 + 0.8) / 4)
    close(grad, [[-R_UP_IN / 4, 0.0], [0.0, 0.0]])


def test_nsr_widen_is_clip_higher_on_the_band() -> None:
    cfg = PolicyLossConfig(name="nsr-widen", delta=0.1)
    loss, grad, _ = run(cfg, [[R_UP_IN, R_UP_OUT, 1.1]], [1.0])
    close(loss, (-R_UP_IN - 1.28 - 1.1) / 3)
    close(grad, [[-R_UP_IN / 3, 0.0, -1.1 / 3]])


def _steps_with_outcome(p: float, seed: int, sample_id: int, token: int) -> tuple[int, int]:
    """First step whose draw u < p (a rescue) and first with u >= p, read from the hash itself."""
    hits = [uniform(seed, s, torch.tensor([sample_id]), token).item() < p for s in range(64)]
    return hits.index(True), hits.index(False)


def test_nsr_noise_draw_decides_exactly_as_the_hash_says() -> None:
    # r = 1.3, A = +1, sigma 0.1: rescued iff (0.9 + 0.2 u) * 1.3 <= 1.28 iff u < p = (1.28/1.3 - 0.9)/0.2
    p = (1.28 / 1.3 - 0.9) / 0.2
    cfg = PolicyLossConfig(name="nsr", seed=11)
    rescue_step, clip_step = _steps_with_outcome(p, 11, sample_id=42, token=3)
    ratios = [[1.0, 1.0, 1.0, 1.3]]  # token index 3
    sid = torch.tensor([42])
    loss, grad, stats = run(cfg, ratios, [1.0], step=rescue_step, sample_ids=sid)
    close(loss, (-3.0 - 1.3) / 4)
    close(grad[0][3], -1.3 / 4)
    assert stats["rescue_frac/upper"] == 0.25
    loss, grad, stats = run(cfg, ratios, [1.0], step=clip_step, sample_ids=sid)
    close(loss, (-3.0 - 1.28) / 4)
    close(grad[0][3], 0.0)
    assert stats["rescue_frac"] == 0.0 and stats["rescue/expected_frac"] == pytest.approx(p / 4)
    # token_index moves the draw with the token: the same token at column 0 with index 3 decides the same
    loss2, _, _ = run(cfg, [[1.3]], [1.0], step=rescue_step, token_index=torch.tensor([[3]]), sample_ids=sid)
    close(loss2, -1.3)


def test_nsr_noisy_ratio_value_and_lower_side() -> None:
    # lower side, A = -1, r = 0.76: rescued iff (0.9 + 0.2 u) * 0.76 >= 0.8
    # iff u >= 1 - p with p = (1.1 - 0.8/0.76)/0.2
    cfg = PolicyLossConfig(name="nsr", rescued_value="noisy_ratio", seed=5)
    sid = torch.tensor([9])
    outcomes = []
    for step in range(64):
        u = uniform(5, step, sid, 0).item()
        noise = 0.9 + 0.2 * u
        loss, grad, _ = run(cfg, [[0.76]], [-1.0], step=step, sample_ids=sid)
        if noise * 0.76 >= 0.8:  # rescued with the noisy ratio as value: L = -A * u * r, grad u * r
            close(loss, noise * 0.76)
            close(grad, [[noise * 0.76]])
        else:
            close(loss, 0.8)
            close(grad, [[0.0]])
        outcomes.append(noise * 0.76 >= 0.8)
    assert any(outcomes) and not all(outcomes)


def test_nsr_decay_value_is_clip_and_gradient_is_p_times_unclipped() -> None:
    # upper: r=1.3, A=+1, p=0.4230769: value -1.28, grad -p * 1.3; lower: r=0.76, A=-1, p=0.2368421: value 0.8
    p_up, p_lo = (1.28 / 1.3 - 0.9) / 0.2, (1.1 - 0.8 / 0.76) / 0.2
    loss, grad, stats = run(PolicyLossConfig(name="nsr-decay"), [[1.3], [0.76]], [1.0, -1.0])
    close(loss, (-1.28 + 0.8) / 2)
    close(grad, [[-p_up * 1.3 / 2], [p_lo * 0.76 / 2]])
    assert stats["rescue_frac"] == pytest.approx((p_up + p_lo) / 2)  # decay reports expected rescues


def test_nsr_gspo_rescues_whole_sequences() -> None:
    # eps 3e-4 / 4e-4, sigma 2e-4: seq ratio s = e^0.0005 (upper, A=+1): p = (1.0004 / s - 0.9998) / 4e-4
    cfg = PolicyLossConfig(name="nsr-gspo", seed=1)
    s = math.exp(0.0005)
    p = (1.0004 / s - (1 - 2e-4)) / (4e-4)
    assert 0.0 < p < 1.0
    sid = torch.tensor([4])
    seen = set()
    for step in range(40):
        rescued = (1 - 2e-4 + 4e-4 * uniform(1, step, sid, -1).item()) * s <= 1.0004
        loss, grad, stats = run(cfg, [[s, s, s]], [1.0], step=step, sample_ids=sid)
        close(loss, -s if rescued else -1.0004)
        close(grad, [[-s / 3] * 3 if rescued else [0.0] * 3])
        assert stats["seq/rescue_frac"] == (1.0 if rescued else 0.0)
        seen.add(rescued)
    assert seen == {True, False}


# ---- TIS / MIS / KL ------------------------------------------------------------------------------------


def test_tis_weight_and_mis_mask() -> None:
    # w = exp(old - rollout); old = 0. token0: rollout log(1/3) -> w = 3 capped to 2; token1: w = 1
    rollout = torch.tensor([[math.log(1 / 3), 0.0]], dtype=torch.float64)
    cfg = PolicyLossConfig(name="dapo", tis_cap=2.0)
    loss, grad, stats = run(cfg, [[1.1, 1.0]], [1.0], rollout_logprobs=rollout)
    close(loss, (-1.1 * 2 - 1.0) / 2)
    close(grad, [[-1.1 * 2 / 2, -0.5]])
    assert stats["tis/weight_mean"] == pytest.approx(1.5) and stats["tis/clip_frac"] == 0.5
    # MIS [0.5, 1.5]: token0 (w = 3) leaves the loss and the denominator
    cfg = PolicyLossConfig(name="dapo", mis_low=0.5, mis_high=1.5)
    loss, grad, stats = run(cfg, [[1.1, 1.0]], [1.0], rollout_logprobs=rollout)
    close(loss, -1.0)
    close(grad, [[0.0, -1.0]])
    assert stats["tokens"] == 1 and stats["mis/masked_frac"] == 0.5


def test_kl_penalty_estimators() -> None:
    # logp = log 1.1, ref = 0: x = ref - logp = -log 1.1; k1 = log 1.1; k3 = e^x - x - 1 = 1/1.1 + log 1.1 - 1
    ref = torch.zeros(1, 1, dtype=torch.float64)
    k1, k3 = math.log(1.1), 1 / 1.1 + math.log(1.1) - 1
    for est, kl, dkl in (("k1", k1, 1.0), ("k3", k3, 1 - 1 / 1.1), ("low-var-k3", k3, 1 - 1 / 1.1)):
        cfg = PolicyLossConfig(name="dapo", kl_coef=0.5, kl_estimator=est)  # type: ignore[arg-type]
        loss, grad, stats = run(cfg, [[1.1]], [1.0], ref_logprobs=ref)
        close(loss, -1.1 + 0.5 * kl)
        close(grad, [[-1.1 + 0.5 * dkl]])
        assert stats["kl_ref"] == pytest.approx(kl)
    with pytest.raises(
        ValueError, match=r"kl_coef=0.5 needs ref_logprobs \[B, T\]; pass them or set kl_coef=0."
    ):
        run(PolicyLossConfig(name="dapo", kl_coef=0.5), [[1.1]], [1.0])


# ---- statistics and input errors -----------------------------------------------------------------------


def test_statistics_histogram_entropy_and_kl_old() -> None:
    # dapo: upper boundary 1.28, eps_high 0.28; (r - 1.28) / 0.28 for r = 1.35 is 0.25 -> bin [+0.25, +0.5)
    ent = torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    _, _, stats = run(PolicyLossConfig(name="dapo"), [[1.35, 1.0]], [1.0], entropy=ent)
    assert stats["ratio_hist/upper/+0.25"] == 0.5
    assert stats["ratio_hist/upper/-1"] == 0.5  # r = 1.0: (1.0 - 1.28) / 0.28 = -1 exactly -> [-1, -0.5)
    assert stats["entropy"] == 1.0
    assert stats["ratio/mean_abs_dev"] == pytest.approx(0.175)
    assert stats["kl_old"] == pytest.approx((1.35 - 1 - math.log(1.35)) / 2)  # k3 = r - 1 - log r


def test_input_errors_name_the_argument() -> None:
    cfg = PolicyLossConfig(name="nsr")
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"needs sample_ids \[B\] \(int64\) and step"):
        policy_loss(cfg, lp, lp, torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\); expected \(2, 3\)"):
        policy_loss(cfg, lp, lp, torch.ones(2), torch.ones(2, 4), sample_ids=torch.arange(2), step=0)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\); expected \[B\]=\(2,\)"):
        policy_loss(cfg, lp, lp, torch.ones(3), torch.ones(2, 3), sample_ids=torch.arange(2), step=0)
    with pytest.raises(ValueError, match="need rollout_logprobs"):
        policy_loss(PolicyLossConfig(name="dapo", tis_cap=2.0), lp, lp, torch.ones(2), torch.ones(2, 3))


def test_masked_positions_with_garbage_do_not_leak() -> None:
    lp = torch.tensor([[0.1, float("-inf")], [0.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[0.0, float("-inf")], [0.0, 3.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    for name in ("nsr", "gspo-token", "cispo"):
        loss, sums = policy_loss(
            PolicyLossConfig(name=name),
            lp,
            old,
            torch.tensor([1.0, -1.0]),
            mask,
            sample_ids=torch.arange(2),
            step=1,
        )
        loss.backward()
        assert torch.isfinite(loss) and lp.grad is not None and torch.isfinite(lp.grad).all(), name
        assert lp.grad[:, 1].abs().sum() == 0.0
        assert all(torch.isfinite(v) for v in sums.values())
        lp.grad = None
