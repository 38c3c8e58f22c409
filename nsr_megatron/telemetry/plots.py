"""PNG plots from ``metrics.jsonl``: one run's curves, and several runs' reward curves on one figure.

Figures are drawn with ``matplotlib.figure.Figure`` (the Agg renderer, no pyplot and no global backend switch), so
plotting works on headless nodes and does not disturb a caller's own matplotlib state. Each plot shows the raw
values faintly and, with ``smooth > 1``, a trailing moving average on top. Steps where a value is missing or null
are skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nsr_megatron.telemetry.metrics import read_metrics

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"

# file stem -> (title, y label, metric keys drawn on it). A plot whose keys are all absent is skipped.
RUN_PLOTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "reward": ("Reward", "mean reward", ("reward/mean",)),
    "response_length": ("Response length", "tokens", ("response_length/mean",)),
    "entropy": ("Entropy", "nats / token", ("entropy",)),
    "clip_rescue": ("Clip and rescue fractions", "fraction of tokens",
                    ("clip_frac/upper", "clip_frac/lower", "rescue_frac")),
}


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key``, skipping records where it is missing, null, non-numeric or non-finite."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what exists)."""
    if window < 1:
        raise ValueError(f"moving_average(window={window}): the window must be >= 1.")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def default_window(num_steps: int) -> int:
    """The smoothing window of a run's plots: a tenth of the run, between 1 and 10 steps."""
    return max(1, min(10, num_steps // 10))


def _draw(ax: Any, steps: list[int], values: list[float], label: str, smooth: int) -> None:
    if smooth > 1:  # the raw per-step points, and their moving average on top
        (points,) = ax.plot(steps, values, linestyle="none", marker=".", markersize=3, alpha=0.35)
        ax.plot(steps, moving_average(values, smooth), label=f"{label} ({smooth}-step mean)", linewidth=1.8,
                color=points.get_color())
    else:
        ax.plot(steps, values, label=label, linewidth=1.4, marker="." if len(steps) < 30 else None)


def _new_figure(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, smooth: int | None = None) -> list[Path]:
    """Draw ``RUN_PLOTS`` (reward, response length, entropy, clip/rescue fractions) and one ``timing`` plot of the
    ``timing/*`` keys from ``<run_dir>/metrics.jsonl`` into ``out_dir`` (default ``<run_dir>/plots``).

    Every plot shows the per-step points and a ``smooth``-step moving average (default: :func:`default_window`).

    Returns:
        The PNG files written; plots with no data are skipped with a log line.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"plot_run: {metrics_path} does not exist; is {run_dir} a run directory?")
    records = read_metrics(metrics_path)
    smooth = default_window(len(records)) if smooth is None else smooth
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    timing_keys = tuple(sorted({k for r in records for k in r if k.startswith("timing/")}))
    eval_keys = tuple(sorted({k for r in records for k in r if k.startswith("eval/") and "@" in k}))
    panels = {**RUN_PLOTS, "eval": ("Evaluation (eval.data)", "accuracy", eval_keys),
              "timing": ("Time per step", "seconds", timing_keys)}
    written = []
    for stem, (title, ylabel, keys) in panels.items():
        fig, ax = _new_figure(title, ylabel)
        drawn = 0
        for key in keys:
            steps, values = series(records, key)
            if steps:
                _draw(ax, steps, values, key, smooth)
                drawn += 1
        if not drawn:
            logger.info("plot_run: no data for %s (%s) in %s; skipped.", stem, ", ".join(keys) or "-", metrics_path)
            continue
        if drawn > 1 or stem in ("timing", "eval") or smooth > 1:
            ax.legend(fontsize="small")
        path = out / f"{stem}.png"
        fig.savefig(path, format="png")
        written.append(path)
    return written


def plot_reward_comparison(
    runs: Sequence[tuple[str, str | Path]],
    out_path: str | Path,
    key: str = "reward/mean",
    smooth: int = 1,
    title: str | None = None,
) -> Path:
    """Several runs' ``key`` curves in one PNG (for loss comparisons).

    Args:
        runs: ``(label, metrics.jsonl path or run directory)`` per run.
        out_path: the PNG to write (parent directories are created).
        key: the metric to compare.
        smooth: moving-average window (1: raw values).
        title: figure title (default: ``key``).

    Raises:
        ValueError: if ``runs`` is empty or no run has any value of ``key``.
    """
    if not runs:
        raise ValueError("plot_reward_comparison: runs is empty; pass [(label, metrics.jsonl path), ...].")
    fig, ax = _new_figure(title or key, key)
    drawn = 0
    for label, path in runs:
        steps, values = series(read_metrics(path), key)
        if not steps:
            logger.warning("plot_reward_comparison: %s (%s) has no %r values; left out.", label, path, key)
            continue
        _draw(ax, steps, values, label, smooth)
        drawn += 1
    if not drawn:
        raise ValueError(f"plot_reward_comparison: none of the {len(runs)} runs has {key!r} values.")
    ax.legend(fontsize="small")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
