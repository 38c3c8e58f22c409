"""The routing statistics on hand-built routing: counts, imbalance, entropy, margin, drift, and the log."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nsr_megatron.telemetry.routing import (
    RoutingLog,
    RoutingSums,
    expert_load,
    read_routing,
    router_entropy_and_margin,
    routing_metrics,
    topk_changed,
)


def test_expert_load_counts_every_choice() -> None:
    topk = torch.tensor([[0, 1], [1, 3], [1, 0]])  # 3 tokens, top-2 of 4 experts
    assert expert_load(topk, 4).tolist() == [2.0, 3.0, 0.0, 1.0]


def test_topk_changed_ignores_the_order_within_a_set() -> None:
    a = torch.tensor([[0, 1], [2, 3], [0, 2]])
    b = torch.tensor([[1, 0], [2, 1], [0, 2]])
    assert topk_changed(a, b).tolist() == [False, True, False]


def test_entropy_and_margin_by_hand() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    logits = torch.log(p.clamp(min=1e-30))
    entropy, margin = router_entropy_and_margin(logits, k=2)
    want = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert entropy[0].item() == pytest.approx(want, abs=1e-6)
    assert entropy[1].item() == pytest.approx(math.log(4), abs=1e-6)
    assert margin[0].item() == pytest.approx(0.3 - 0.2, abs=1e-6) and margin[1].item() == pytest.approx(0.0, abs=1e-6)



def test_sigmoid_routers_are_measured_on_their_scores_and_the_bias_decides_the_margin() -> None:
    # sigmoid scores 0.8, 0.6, 0.5, 0.2: entropy of the scores normalized to sum 1
    s = torch.tensor([[0.8, 0.6, 0.5, 0.2]], dtype=torch.float64)
    logits = torch.log(s / (1 - s))
    entropy, margin = router_entropy_and_margin(logits, k=2, score_function="sigmoid")
    p = s / s.sum()
    assert entropy[0].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-9)
    assert margin[0].item() == pytest.approx(0.6 - 0.5, abs=1e-9)
    # with a bias expert 3 is chosen second (0.2 + 0.5 = 0.7) and expert 1 third: the margin is of s + b
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    entropy_b, margin_b = router_entropy_and_margin(logits, k=2, score_function="sigmoid", expert_bias=bias)
    assert entropy_b[0].item() == pytest.approx(entropy[0].item())  # the bias does not weight the experts
    assert margin_b[0].item() == pytest.approx(0.7 - 0.6, abs=1e-9)
    # the softmax reading of the same logits is another number: the score function matters
    assert router_entropy_and_margin(logits, k=2)[0][0].item() != pytest.approx(entropy[0].item())
    with pytest.raises(ValueError, match="score_function='sparsemax'"):
        router_entropy_and_margin(logits, k=2, score_function="sparsemax")

def test_metrics_by_hand() -> None:
    sums = RoutingSums.zeros(2, 4)
    sums.load[0] = torch.tensor([4.0, 2.0, 2.0, 0.0])  # mean 2: max/mean 2, one dead expert
    sums.load[1] = torch.tensor([2.0, 2.0, 2.0, 2.0])  # balanced
    sums.tokens[:] = torch.tensor([4.0, 4.0])
    sums.entropy_sum[:] = torch.tensor([4.0, 2.0])
    sums.margin_sum[:] = torch.tensor([0.8, 0.0])
    sums.drift_old[:] = torch.tensor([[1.0, 4.0], [3.0, 4.0]])
    sums.rescued[0] = torch.tensor([0.0, 0.0, 4.0, 0.0])  # rescued tokens all went to expert 2
    m = routing_metrics(sums)
    assert m["routing/imbalance_max_mean"] == pytest.approx((2.0 + 1.0) / 2)
    cv0 = torch.tensor([4.0, 2.0, 2.0, 0.0]).std(unbiased=False).item() / 2
    assert m["routing/imbalance_cv"] == pytest.approx(cv0 / 2)
    assert m["routing/dead_expert_frac"] == pytest.approx(1 / 8)
    assert m["routing/entropy"] == pytest.approx(6.0 / 8) and m["routing/topk_margin"] == pytest.approx(0.1)
    assert m["routing/drift_old_train"] == pytest.approx(4 / 8)
    assert "routing/drift_rollout_train" not in m  # nothing was compared
    overall = torch.tensor([6.0, 4.0, 4.0, 2.0]) / 16
    tv = 0.5 * (torch.tensor([0.0, 0.0, 1.0, 0.0]) - overall).abs().sum().item()
    assert m["routing/rescued_load_tv"] == pytest.approx(tv)
    assert routing_metrics(RoutingSums.zeros(2, 4)) == {}  # a step that routed nothing


def test_sums_round_trip_through_one_flat_tensor() -> None:
    sums = RoutingSums.zeros(3, 5)
    sums.load[1, 2] = 7.0
    sums.drift_rollout[2, 1] = 3.0
    copy = RoutingSums.zeros(3, 5)
    copy.load_flat(sums.flat() * 2)
    assert copy.load[1, 2] == 14.0 and copy.drift_rollout[2, 1] == 6.0


def test_routing_log_resumes_at_a_step(tmp_path: Path) -> None:
    log = RoutingLog(tmp_path)
    for step in (1, 2, 3):
        sums = RoutingSums.zeros(1, 2)
        sums.load[0] = torch.tensor([float(step), 1.0])
        sums.tokens[0] = 1.0
        log.log(step, sums)
    log.close()
    log = RoutingLog(tmp_path, resume_step=2)
    log.close()
    rows = read_routing(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["layers"][0]["load"] == [2.0, 1.0]
