"""Multi-seed comparison of losses (``nsr-megatron compare``): per-step mean curves with 95% intervals over seeds,
and a Markdown table of final and best values with intervals and the seed-to-seed spread.

Pure aggregation of finished runs' ``metrics.jsonl`` (no torch, no megatron). For one metric and one loss with
seeds s = 1..n:

- the curve at step t is the mean over seeds of the run's value at t, with the 95% interval
  ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (Student's t; none for n = 1);
- a run's **final** value is the mean over its last ``tail`` steps that have the metric (default: the last tenth,
  at least 1), its **best** value the highest moving average (window ``tail``);
- the **spread** is the standard deviation of the final values over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "aggregate", "interval", "plot_comparison", "read_runs", "table"]

# The metrics compared, in the order of the table and the figure; a metric no run logged is left out.
METRICS = ("reward/mean", "eval/pass@1", "entropy", "response_length/mean", "clip_frac/upper", "clip_frac/lower",
           "band_frac", "rescue_frac")

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def _t975(dof: int) -> float:
    if dof in _T975:
        return _T975[dof]
    below = [d for d in _T975 if d <= dof]
    return _T975[max(below)] if dof <= 30 else 1.96


def interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval) of ``values``; the half-width is 0 for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, _t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def read_runs(runs: dict[str, dict[int, Path]]) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """``{loss: {seed: run_dir}}`` -> ``{loss: {seed: metrics rows}}``."""
    out: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for loss, seeds in runs.items():
        out[loss] = {}
        for seed, run_dir in seeds.items():
            with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
                out[loss][seed] = [json.loads(line) for line in f if line.strip()]
    return out


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]


def aggregate(data: dict[str, dict[int, list[dict[str, Any]]]], tail: int = 0) -> dict[str, Any]:
    """Curves and summary values per metric and loss (see the module docstring)."""
    out: dict[str, Any] = {"metrics": {}}
    for key in METRICS:
        per_loss: dict[str, Any] = {}
        for loss, seeds in data.items():
            series = {seed: _series(rows, key) for seed, rows in seeds.items()}
            series = {s: v for s, v in series.items() if v}
            if not series:
                continue
            steps = sorted(set.intersection(*(set(t for t, _ in v) for v in series.values())))
            curve = []
            for step in steps:
                values = [dict(v)[step] for v in series.values()]
                mean, half = interval(values)
                curve.append({"step": step, "mean": mean, "low": mean - half, "high": mean + half})
            finals, bests = [], []
            for v in series.values():
                values = [x for _, x in v]
                n = tail or max(1, len(values) // 10)
                finals.append(statistics.fmean(values[-n:]))
                bests.append(max(statistics.fmean(values[i : i + n]) for i in range(len(values) - n + 1)))
            f_mean, f_half = interval(finals)
            b_mean, b_half = interval(bests)
            per_loss[loss] = {"curve": curve, "seeds": len(series), "final": f_mean, "final_ci": f_half,
                              "best": b_mean, "best_ci": b_half,
                              "spread": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                              "finals": finals}
        if per_loss:
            out["metrics"][key] = per_loss
    return out


def table(summary: dict[str, Any]) -> str:
    """The Markdown table: per metric and loss, final and best (mean +- 95% interval over seeds) and spread."""
    lines = ["| metric | loss | seeds | final | best | spread (sd of finals) |", "|---|---|---|---|---|---|"]
    for key, per_loss in summary["metrics"].items():
        for loss, s in per_loss.items():
            lines.append(f"| {key} | {loss} | {s['seeds']} | {s['final']:.4f} +- {s['final_ci']:.4f} | "
                         f"{s['best']:.4f} +- {s['best_ci']:.4f} | {s['spread']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_comparison(summary: dict[str, Any], out_path: str | Path) -> Path:
    """One panel per metric, a mean curve per loss with its 95% band."""
    from matplotlib.figure import Figure

    keys = list(summary["metrics"])
    cols = 2
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(6.0 * cols, 3.2 * rows), dpi=100, layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        for loss, s in summary["metrics"][key].items():
            steps = [p["step"] for p in s["curve"]]
            (line,) = ax.plot(steps, [p["mean"] for p in s["curve"]], label=f"{loss} (n={s['seeds']})", linewidth=1.5)
            ax.fill_between(steps, [p["low"] for p in s["curve"]], [p["high"] for p in s["curve"]],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
