"""Multi-seed comparison of losses (``nsr-megatron compare``): per-step mean curves with 95% intervals over seeds, a
table of final and best values, and paired per-seed differences against a baseline beside an A/A noise floor.

Pure aggregation of finished runs' ``metrics.jsonl`` (no torch, no megatron). Runs are grouped by label (a loss
name; ``<loss>-aa`` for the A/A control) and paired by seed.

**final.** A run that logged S steps, the last one T, has the final window ``t > T - w`` with ``w = max(1, S // 10)``
(the last tenth of its steps; ``tail`` sets w). A metric's final value is the mean of its points in the window: w
points for a per-step metric; for an eval metric (logged at eval steps only) the eval points in the window, or the
last eval point when none falls there. ``points`` records how many were averaged. A run's **best** value is the
highest moving average of that many consecutive points.

**Across seeds** (one metric, one group, finals x_1..x_n): ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (Student t;
no interval for n = 1); for a metric that lies in [0, 1] (fractions, pass@1) the interval is cut to [0, 1], where a
mean of such values lies. The **spread** is the sd of the finals.

**Paired against a baseline** (group g, baseline b): ``d_s = final_g(s) - final_b(s)`` over the seeds both ran, and
``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)``. Runs of one seed share the initial model, the prompt order and
the draws, so pairing takes that seed's luck out of the difference. Wins / losses / ties count ``d_s > 0``, ``< 0``
and ``= 0`` for the metrics where higher is better (reward, pass@1); for the others they read higher / lower /
equal. A seed that only one of the two groups ran is listed and left out.

**A/A noise floor.** Two groups of one loss that differ only in the sampling and rescue draws (same seeds, so the
same initial model and prompt order): their paired interval is what the comparison shows when the loss does not
differ. A real difference whose interval lies within that spread is not told apart from the draws.

**Within one run** (eval pass@1, a mean over N problems of per-problem values in [0, 1]): the Wilson score interval
with n = N (Wilson 1927), which stays in [0, 1]. It is conservative for pass@1 with several samples per problem:
a mean of N independent values in [0, 1] with mean p has variance at most p (1 - p) / N, the binomial one.

Student-t quantiles come from the regularised incomplete beta function (its continued fraction, Numerical Recipes
section 6.4) inverted by bisection, to about 1e-10 (no scipy).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "aggregate", "final_value", "interval", "paired", "plot_comparison", "read_eval_problems",
           "read_runs", "report", "t_cdf", "t_quantile", "table", "wilson"]

# The metrics compared, in the order of the table and the figure; a metric no run logged is left out.
METRICS = ("reward/mean", "eval/pass@1", "entropy", "response_length/mean", "clip_frac/upper", "clip_frac/lower",
           "band_frac", "rescue_frac")
HIGHER_IS_BETTER = frozenset({"reward/mean", "eval/pass@1"})
_ITEM_MEANS = ("eval/pass@", "eval/avg@", "eval/maj@")  # means over eval problems: Wilson intervals per run
_FRACTIONS = frozenset({"clip_frac/upper", "clip_frac/lower", "band_frac", "rescue_frac"})
Z975 = 1.959963984540054  # the standard normal's 0.975 quantile


def _in_unit(key: str) -> bool:
    return key in _FRACTIONS or key.startswith(_ITEM_MEANS)


# ------------------------------------------------------------------------------------------------ distributions
def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), for x < (a + 1) / (a + b + 2)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
                    -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _beta_inc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(x: float, dof: float) -> float:
    """P(T <= x) for Student's t with ``dof`` degrees of freedom: ``1 - I_{dof/(dof+x^2)}(dof/2, 1/2) / 2`` for x > 0."""
    if dof <= 0:
        raise ValueError(f"t_cdf(dof={dof}): degrees of freedom must be > 0.")
    tail = 0.5 * _beta_inc(dof / 2.0, 0.5, dof / (dof + x * x))
    return 1.0 - tail if x > 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t with ``dof`` degrees of freedom (``t_quantile(0.975, 4) = 2.776...``); the
    normal quantile for infinite ``dof``. Bisection on :func:`t_cdf` to a relative 1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile(p={p}): p must lie in (0, 1).")
    if dof <= 0:
        raise ValueError(f"t_quantile(dof={dof}): degrees of freedom must be > 0.")
    if math.isinf(dof):
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval) of ``values``; the half-width is 0 for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def wilson(p: float, n: int, z: float = Z975) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` over ``n`` items:
    ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``, always within [0, 1] (at p = 0 it is
    ``[0, z^2/(n+z^2)]``, at p = 1 ``[n/(n+z^2), 1]``)."""
    if n < 1:
        raise ValueError(f"wilson(n={n}): need at least one item.")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"wilson(p={p}): a proportion lies in [0, 1].")
    if p > 0.5:  # computed from the smaller side, so that p = 1 ends at 1 exactly, as p = 0 starts at 0
        low, high = wilson(1.0 - p, n, z)
        return 1.0 - high, 1.0 - low
    z2 = z * z
    if p == 0.0:  # the closed form; the general one leaves a rounding residue above 0
        return 0.0, z2 / (n + z2)
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------------------------------------ reading runs
def read_runs(runs: Mapping[str, Mapping[int, Path]]) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """``{label: {seed: run_dir}}`` -> ``{label: {seed: metrics rows}}``, one row per step (the last one logged for a
    step wins)."""
    out: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for label, seeds in runs.items():
        out[label] = {}
        for seed, run_dir in seeds.items():
            by_step: dict[int, dict[str, Any]] = {}
            with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line) if line.strip() else None
                    except json.JSONDecodeError:  # a torn last line of a killed run
                        continue
                    if isinstance(row, dict) and isinstance(row.get("step"), int):
                        by_step[row["step"]] = row
            out[label][seed] = [by_step[t] for t in sorted(by_step)]
    return out


def read_eval_problems(run_dir: Path) -> int | None:
    """How many problems the run's in-loop eval averaged over (its ``config.yaml``: the lines of ``eval.data``, at
    most ``eval.max_problems``); None when the run did not evaluate or the file is not a readable JSONL."""
    import yaml

    try:
        with open(Path(run_dir) / "config.yaml", encoding="utf-8") as f:
            ev = (yaml.safe_load(f) or {}).get("eval") or {}
        if not ev.get("interval") or not str(ev.get("data", "")).endswith((".jsonl", ".ndjson")):
            return None
        with open(ev["data"], encoding="utf-8") as f:
            count = sum(1 for line in f if line.strip())
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None
    limit = int(ev.get("max_problems") or 0)
    return min(count, limit) if limit else count


# ------------------------------------------------------------------------------------------------ aggregation
def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def final_value(rows: list[dict[str, Any]], key: str, tail: int = 0) -> dict[str, Any] | None:
    """A run's final and best value of ``key`` (module docstring): ``{"final", "best", "points", "window",
    "last_step"}``; None when the run never logged ``key``."""
    series = _series(rows, key)
    if not series:
        return None
    steps = sorted({int(r["step"]) for r in rows})
    window = tail or max(1, len(steps) // 10)
    values = [v for t, v in series if t > steps[-1] - window] or [series[-1][1]]
    n = len(values)
    all_values = [v for _, v in series]
    best = max(statistics.fmean(all_values[i : i + n]) for i in range(len(all_values) - n + 1))
    return {"final": statistics.fmean(values), "best": best, "points": n, "window": window, "last_step": steps[-1]}


def _cut(key: str, low: float, high: float, lo_bound: float = 0.0) -> tuple[float, float]:
    return (max(lo_bound, low), min(1.0, high)) if _in_unit(key) else (low, high)


def paired(base: Mapping[int, float], other: Mapping[int, float], *, key: str = "") -> dict[str, Any]:
    """The paired comparison of ``other`` against ``base`` (``{seed: final}`` each; module docstring): pairs, mean
    difference, half-width and bounds of its 95% Student-t interval (None for one pair), wins / losses / ties, and the
    seeds only one side has (left out)."""
    seeds = sorted(set(base) & set(other))
    diffs = [other[s] - base[s] for s in seeds]
    row: dict[str, Any] = {"metric": key, "pairs": len(seeds), "seeds": seeds, "diffs": diffs,
                           "only_other": sorted(set(other) - set(base)), "only_base": sorted(set(base) - set(other)),
                           "higher_is_better": key in HIGHER_IS_BETTER, "mean": None, "half": None,
                           "low": None, "high": None, "wins": 0, "losses": 0, "ties": 0}
    if not diffs:
        return row
    mean, half = interval(diffs)
    row["mean"] = mean
    if len(diffs) > 1:
        row["half"] = half
        row["low"], row["high"] = _cut(key, mean - half, mean + half, lo_bound=-1.0)
    for d, s in zip(diffs, seeds, strict=True):
        scale = max(1.0, abs(base[s]), abs(other[s]))
        outcome = "ties" if abs(d) <= 1e-12 * scale else "wins" if d > 0 else "losses"
        row[outcome] += 1
    return row


def aggregate(data: Mapping[str, Mapping[int, list[dict[str, Any]]]], tail: int = 0, *, baseline: str | None = None,
              aa: tuple[str, str] | None = None,
              problems: Mapping[str, Mapping[int, int | None]] | None = None) -> dict[str, Any]:
    """Curves, finals and paired comparisons (module docstring).

    Args:
        data: ``{label: {seed: metrics rows}}`` (:func:`read_runs`).
        tail: steps in a run's final window (0: the last tenth of its steps).
        baseline: the label every other group is compared with, seed by seed (None: no paired comparison).
        aa: ``(control, repeat)``: two labels of one loss that differ only in their draws; ``repeat - control`` is
            the noise floor, and ``repeat`` is left out of the real comparisons.
        problems: ``{label: {seed: eval problems}}`` (:func:`read_eval_problems`) for the per-run Wilson intervals.
    """
    for name, what in ((baseline, "--baseline"), *((a, "--aa") for a in (aa or ()))):
        if name is not None and name not in data:
            raise ValueError(f"{what} {name!r} names no group of runs; the groups are {sorted(data)}.")
    out: dict[str, Any] = {"tail": tail, "baseline": baseline, "aa": list(aa) if aa else None, "metrics": {},
                           "paired": []}
    for key in METRICS:
        per_label: dict[str, Any] = {}
        for label, seeds in data.items():
            found = {s: final_value(rows, key, tail) for s, rows in sorted(seeds.items())}
            runs: dict[int, dict[str, Any]] = {s: r for s, r in found.items() if r is not None}
            if not runs:
                continue
            series = {s: dict(_series(seeds[s], key)) for s in runs}
            steps = sorted(set.intersection(*(set(v) for v in series.values())))
            curve = []
            for step in steps:
                mean, half = interval([v[step] for v in series.values()])
                low, high = _cut(key, mean - half, mean + half)
                curve.append({"step": step, "mean": mean, "low": low, "high": high})
            finals = [r["final"] for r in runs.values()]
            f_mean, f_half = interval(finals)
            b_mean, b_half = interval([r["best"] for r in runs.values()])
            f_low, f_high = _cut(key, f_mean - f_half, f_mean + f_half)
            for s, r in runs.items():
                n = (problems or {}).get(label, {}).get(s)
                r["problems"] = n
                r["wilson"] = list(wilson(min(1.0, max(0.0, r["final"])), n)) if n and key.startswith(_ITEM_MEANS) \
                    else None
            per_label[label] = {"curve": curve, "seeds": len(runs), "seed_list": list(runs), "final": f_mean,
                                "final_ci": f_half, "final_low": f_low, "final_high": f_high,
                                "best": b_mean, "best_ci": b_half,
                                "spread": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                                "finals": finals, "points": [r["points"] for r in runs.values()], "runs": runs}
        if not per_label:
            continue
        out["metrics"][key] = per_label
        finals_of = {label: {s: r["final"] for s, r in v["runs"].items()} for label, v in per_label.items()}
        if aa and aa[0] in finals_of and aa[1] in finals_of:
            out["paired"].append({**paired(finals_of[aa[0]], finals_of[aa[1]], key=key), "group": aa[1],
                                  "base": aa[0], "aa": True})
        if baseline in finals_of:
            for label in finals_of:
                if label != baseline and not (aa and label == aa[1]):
                    out["paired"].append({**paired(finals_of[baseline], finals_of[label], key=key),
                                          "group": label, "base": baseline, "aa": False})
    return out


# ------------------------------------------------------------------------------------------------ rendering
def _span(values: Sequence[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def table(summary: dict[str, Any]) -> str:
    """The Markdown table: per metric and group, final and best (mean +- 95% interval over seeds), spread, the final
    interval as bounds (cut to [0, 1] for fractions and pass@1) and how many points each run's final averaged."""
    lines = ["| metric | loss | seeds | final | best | spread (sd of finals) | final 95% interval | points |",
             "|---|---|---|---|---|---|---|---|"]
    for key, per_label in summary["metrics"].items():
        for label, s in per_label.items():
            bounds = f"[{s['final_low']:.4f}, {s['final_high']:.4f}]" if s["seeds"] > 1 else "n/a (1 seed)"
            lines.append(f"| {key} | {label} | {s['seeds']} | {s['final']:.4f} +- {s['final_ci']:.4f} | "
                         f"{s['best']:.4f} +- {s['best_ci']:.4f} | {s['spread']:.4f} | {bounds} | "
                         f"{_span(s['points'])} |")
    return "\n".join(lines) + "\n"


def paired_table(summary: dict[str, Any]) -> str:
    """The paired differences against the baseline, each metric's A/A noise floor first; empty without a baseline
    or an A/A pair."""
    if not summary["paired"]:
        return ""
    lines = ["| metric | comparison | pairs | mean difference | 95% interval | excludes 0 | wins / losses / ties | "
             "left out (unpaired seeds) |", "|---|---|---|---|---|---|---|---|"]
    for row in summary["paired"]:
        what = (f"A/A noise floor: {row['group']} - {row['base']}" if row["aa"]
                else f"{row['group']} - {row['base']}")
        if row["mean"] is None:
            diff = bounds = excludes = "n/a (no pair)"
        else:
            diff = f"{row['mean']:+.4f}"
            if row["low"] is None:
                bounds = excludes = "n/a (1 pair)"
            else:
                bounds = f"[{row['low']:+.4f}, {row['high']:+.4f}]"
                excludes = "yes" if row["low"] > 0 or row["high"] < 0 else "no"
        counts = (f"{row['wins']} / {row['losses']} / {row['ties']}" if row["higher_is_better"]
                  else f"{row['wins']} higher / {row['losses']} lower / {row['ties']} equal")
        left = "; ".join(f"{g} seeds {', '.join(map(str, seeds))} (none in {o})"
                         for g, o, seeds in ((row["group"], row["base"], row["only_other"]),
                                             (row["base"], row["group"], row["only_base"])) if seeds)
        lines.append(f"| {row['metric']} | {what} | {row['pairs']} | {diff} | {bounds} | {excludes} | {counts} | "
                     f"{left} |")
    return "\n".join(lines) + "\n"


def wilson_table(summary: dict[str, Any]) -> str:
    """Per run, the final eval means over problems with their Wilson intervals; empty when no run evaluated."""
    lines = ["| metric | loss | seed | final | points | problems | Wilson 95% |", "|---|---|---|---|---|---|---|"]
    for key, per_label in summary["metrics"].items():
        if not key.startswith(_ITEM_MEANS):
            continue
        for label, s in per_label.items():
            for seed, r in s["runs"].items():
                bounds = f"[{r['wilson'][0]:.4f}, {r['wilson'][1]:.4f}]" if r["wilson"] else "n/a (problems unknown)"
                lines.append(f"| {key} | {label} | {seed} | {r['final']:.4f} | {r['points']} | "
                             f"{r['problems'] or '?'} | {bounds} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def report(summary: dict[str, Any], title: str = "") -> str:
    """The whole ``compare.md``: the table of finals, the paired differences with the A/A floor, the per-run Wilson
    intervals, and how each number was made."""
    window = (f"the last {summary['tail']} steps" if summary["tail"]
              else "the last tenth of the run's steps (at least 1)")
    parts = [f"# {title}\n" if title else "",
             f"\"final\" = a run's mean over {window}; an eval metric averages its eval points in that window (at "
             "least the last one); \"points\" = how many were averaged. Intervals are 95% Student t over seeds, cut "
             "to [0, 1] for fractions and pass@1.\n", table(summary)]
    pairs = paired_table(summary)
    if pairs:
        aa = summary["aa"]
        parts.append("\n## Paired differences" + (f" against {summary['baseline']}" if summary["baseline"] else "")
                     + "\n\nPer seed, d = final(loss) - final(baseline) of the runs with that seed (same initial model, "
                     "prompt order and draws); mean of d with its 95% Student-t interval over the pairs. Wins / "
                     "losses / ties count the seeds where the loss was above / below / equal (for metrics without a "
                     "better direction: higher / lower / equal). Seeds that only one group ran are left out and "
                     "named.\n")
        if aa:
            parts.append(f"\nA/A noise floor: {aa[1]} runs {aa[0]} again with other sampling and rescue draws (same "
                         "seeds, initial models and prompt orders); its interval is what a comparison shows when "
                         "the loss does not differ.\n")
        parts.append("\n" + pairs)
        left = sorted({(row["group"], s) for row in summary["paired"] for s in row["only_other"]}
                      | {(row["base"], s) for row in summary["paired"] for s in row["only_base"]})
        if left:
            parts.append("\nUnpaired seeds, left out of the paired rows: "
                         + ", ".join(f"{g} seed {s}" for g, s in left) + ".\n")
    wil = wilson_table(summary)
    if wil:
        parts.append("\n## Eval per run\n\nWilson 95% interval over the eval problems of one run (conservative for "
                     "pass@1 over several samples per problem).\n\n" + wil)
    return "".join(parts)


def plot_comparison(summary: dict[str, Any], out_path: str | Path) -> Path:
    """One panel per metric, a mean curve per loss with its 95% band."""
    from matplotlib.figure import Figure

    keys = list(summary["metrics"])
    cols = 2
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(6.0 * cols, 3.2 * rows), dpi=100, layout="constrained")
    # one colour per loss in every panel, also where a metric is missing for some losses
    losses = list(dict.fromkeys(loss for key in keys for loss in summary["metrics"][key]))
    palette = [f"C{k % 10}" for k in range(len(losses))]
    colour = dict(zip(losses, palette, strict=True))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        for loss, s in summary["metrics"][key].items():
            steps = [p["step"] for p in s["curve"]]
            ax.plot(steps, [p["mean"] for p in s["curve"]], label=f"{loss} (n={s['seeds']})", linewidth=1.5,
                    color=colour[loss])
            ax.fill_between(steps, [p["low"] for p in s["curve"]], [p["high"] for p in s["curve"]],
                            color=colour[loss], alpha=0.2, linewidth=0)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
