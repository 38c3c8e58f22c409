"""Did a run learn? The end-of-run verdict on a reward curve, shared by the CLI, the benches and the tests.

A run *learned* when both hold (defaults in brackets):

* gain: the mean reward of the last ``edge`` steps [5] is at least ``min_gain`` [0.3] above the first ``edge``;
* no collapse: the mean of the last ``window`` steps [10] is at least ``keep`` [0.8] of the best ``window``-step
  moving average anywhere in the run.

Rewards are the per-step ``reward/mean`` values of ``metrics.jsonl``, in step order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LearningSummary", "learning_summary"]


@dataclass(frozen=True, kw_only=True)
class LearningSummary:
    """The numbers behind the verdict; ``learned`` is the verdict, ``reason`` says why not."""

    steps: int
    first: float  # mean of the first ``edge`` steps
    last: float  # mean of the last ``edge`` steps
    best_window: float  # best ``window``-step mean
    last_window: float  # mean of the last ``window`` steps
    learned: bool
    reason: str

    def line(self) -> str:
        """One human line: ``learned: reward 0.07 -> 0.91 (best 10-step mean 0.93, last 10 0.92)``."""
        verdict = "learned" if self.learned else f"did NOT learn ({self.reason})"
        return (f"{verdict}: mean reward first steps {self.first:.3f} -> last steps {self.last:.3f} "
                f"(best 10-step mean {self.best_window:.3f}, last 10 {self.last_window:.3f})")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def learning_summary(
    rewards: Sequence[float], *, edge: int = 5, window: int = 10, min_gain: float = 0.3, keep: float = 0.8
) -> LearningSummary:
    """Summarise a reward curve (module docstring); a curve shorter than ``2 * edge`` steps never learned."""
    values = [float(r) for r in rewards]
    k = min(edge, len(values))
    first, last = _mean(values[:k]), _mean(values[-k:])
    w = min(window, len(values))
    windows = [_mean(values[i : i + w]) for i in range(len(values) - w + 1)] if w else [0.0]
    best, last_w = max(windows), _mean(values[-w:]) if w else 0.0
    if len(values) < 2 * edge:
        reason = f"only {len(values)} steps; need at least {2 * edge} to judge"
    elif last - first < min_gain:
        reason = f"gain {last - first:+.3f} is below {min_gain}"
    elif last_w < keep * best:
        reason = f"collapsed: last {w} steps average {last_w:.3f}, below {keep:.0%} of the best window {best:.3f}"
    else:
        reason = ""
    return LearningSummary(steps=len(values), first=first, last=last, best_window=best, last_window=last_w,
                           learned=not reason, reason=reason)
