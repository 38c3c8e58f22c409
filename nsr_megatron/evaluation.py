"""Generation and scoring, and the evaluation metrics: avg@k, unbiased pass@k, maj@k.

:func:`generate_and_score` is the one place where responses are sampled and scored: the training loop's rollout
and ``nsr-megatron eval`` both call it. The rest is pure arithmetic over per-problem results.

- ``avg@k``: the mean accuracy over the k samples of a problem, averaged over problems (the paper's avg@k).
- ``pass@j`` for j = 1..k: the unbiased estimator of Chen et al. (2021), ``1 - C(n - c, j) / C(n, j)`` for n samples
  of which c are correct, averaged over problems. ``pass@1`` is ``c / n``, so it equals ``avg@k`` exactly.
- ``maj@k``: the problem counts as solved when the most frequent final answer among its k samples (the last
  ``\\boxed{...}``, else the last non-empty line; ties go to the answer seen first) is a correct one.

A sample is correct when its reward is at least ``correct_threshold`` (1.0: full credit).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ProblemResult", "final_answer", "generate_and_score", "majority_correct", "pass_at_k", "problem_results",
           "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a problem with ``c`` correct among ``n`` samples (``1 <= k <= n``)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k}).")
    if k == 1:
        return c / n
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n - c, k) / C(n, k) as a product (no huge binomials)
        miss *= 1.0 - k / i
    return 1.0 - miss


_BOXED = re.compile(r"\\boxed\s*\{")


def final_answer(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), else the last non-empty line, stripped."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if starts:
        depth, i = 1, starts[-1]
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        return text[starts[-1] : i - 1].strip() if depth == 0 else text[starts[-1] :].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def majority_correct(answers: Sequence[str], correct: Sequence[bool]) -> bool:
    """Whether the most frequent answer (ties: the one seen first) is among the correct samples' answers."""
    if not answers:
        return False
    top = Counter(answers).most_common(1)[0][0]
    return any(ok for a, ok in zip(answers, correct, strict=True) if a == top)


@dataclass
class ProblemResult:
    index: int
    prompt: str
    answer: str
    responses: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    final_answers: list[str] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def problem_results(records: Sequence[Any], gens: Sequence[Sequence[Any]], rewards: Sequence[float],
                    texts: Sequence[str], k: int, correct_threshold: float = 1.0) -> list[ProblemResult]:
    """Per-problem results from :func:`generate_and_score`'s output (``k`` samples per record)."""
    out = []
    for j, record in enumerate(records):
        got, said = list(rewards[j * k : (j + 1) * k]), list(texts[j * k : (j + 1) * k])
        out.append(ProblemResult(index=record.uid, prompt=record.prompt, answer=record.answer, responses=said,
                                 rewards=got, correct=[r >= correct_threshold for r in got],
                                 final_answers=[final_answer(t) for t in said],
                                 response_tokens=[len(g.response_ids) for g in gens[j]]))
    return out


def summarize(results: Sequence[ProblemResult], k: int) -> dict[str, float]:
    """``avg@k``, ``pass@1`` .. ``pass@k`` and ``maj@k`` over problems with ``k`` samples each."""
    if not results:
        raise ValueError("summarize needs at least one problem.")
    for r in results:
        if len(r.correct) != k:
            raise ValueError(f"problem {r.index} has {len(r.correct)} samples, not k={k}.")
    m = len(results)
    out = {f"avg@{k}": sum(sum(r.correct) / k for r in results) / m}
    for j in range(1, k + 1):
        out[f"pass@{j}"] = sum(pass_at_k(k, sum(r.correct), j) for r in results) / m
    out[f"maj@{k}"] = sum(majority_correct(r.final_answers, r.correct) for r in results) / m
    out["mean_response_tokens"] = sum(sum(r.response_tokens) / k for r in results) / m
    return out


def generate_and_score(engine: Any, scorer: Any, tokenizer: Any, records: Sequence[Any], params: Any, *, n: int,
                       seed: int | None = None, seeds: Sequence[int] | None = None,
                       return_routed_experts: bool = False,
                       phases: Callable[[str], AbstractContextManager[Any]] | None = None,
                       ) -> tuple[list[list[Any]], list[float], Any, list[str]]:
    """Sample ``n`` responses for each record's ``prompt_ids`` with ``engine`` and score them with ``scorer``
    against the record's ``answer``. Draws are keyed by ``seeds`` (one per record) or by ``seed``. ``phases``
    (the loop's phase timer) times generation as ``rollout`` and scoring as ``rewards``.

    Returns ``(generations [record][sample], rewards (flat, record-major), reward stats, decoded texts)``."""
    phase = phases or (lambda _: nullcontext())
    prompts = [list(r.prompt_ids) for r in records]
    kwargs: dict[str, Any] = {"n": n}
    if seeds is not None:
        kwargs["seeds"] = list(seeds)
    else:
        kwargs["seed"] = int(seed or 0)
    if return_routed_experts:
        kwargs["return_routed_experts"] = True
    with phase("rollout"):
        gens = engine.generate(prompts, params, **kwargs)
    flat = [g for per_prompt in gens for g in per_prompt]
    with phase("rewards"):
        texts = [tokenizer.decode(g.response_ids, skip_special_tokens=False) for g in flat]
        answers = [r.answer for r in records for _ in range(n)]
        rewards, stats = scorer.score_batch(texts, answers, [len(g.response_ids) for g in flat])
    return gens, rewards, stats, texts
