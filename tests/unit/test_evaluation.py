"""Evaluation arithmetic (``nsr_megatron.evaluation``): pass@k against hand-computed values, avg@k, maj@k."""

from __future__ import annotations

from math import comb

import pytest

from nsr_megatron.evaluation import ProblemResult, final_answer, majority_correct, pass_at_k, summarize


def test_pass_at_k_hand_values() -> None:
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 3, 2) == 1.0  # k = n, and n - c < k
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0  # all wrong, all right
    for n, c, k in ((16, 3, 5), (16, 7, 8), (10, 1, 9)):
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def _problem(i: int, correct: list[bool], answers: list[str]) -> ProblemResult:
    return ProblemResult(index=i, prompt="p", answer="a", responses=answers, rewards=[float(c) for c in correct],
                         correct=correct, final_answers=answers, response_tokens=[3] * len(correct))


def test_summary_avg_pass_and_majority() -> None:
    results = [
        _problem(0, [True, False, False, False], ["7", "1", "1", "2"]),  # majority "1" is wrong
        _problem(1, [True, True, True, True], ["5"] * 4),
        _problem(2, [False] * 4, ["x", "y", "z", "w"]),
        _problem(3, [False, True, True, False], ["3", "4", "4", "3"]),  # tie 3/4: "3" seen first, wrong
    ]
    s = summarize(results, 4)
    assert s["avg@4"] == pytest.approx((0.25 + 1 + 0 + 0.5) / 4)
    assert s["pass@1"] == s["avg@4"]  # exactly
    assert s["pass@4"] == pytest.approx(3 / 4)
    assert s["pass@2"] == pytest.approx((0.5 + 1 + 0 + (1 - 1 / 6)) / 4)
    assert s["maj@4"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="not k=3"):
        summarize(results, 3)


def test_final_answer_and_majority() -> None:
    assert final_answer("so \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert final_answer("work\n\n  42  \n") == "42"
    assert final_answer("") == ""
    assert majority_correct(["a", "b", "b"], [True, False, False]) is False
    assert majority_correct(["b", "a", "b"], [True, False, True]) is True
