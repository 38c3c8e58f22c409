"""A run's report: one Markdown page (``<run_dir>/report.md``) with a summary table, the run's plots, and, when the
run profiled MoE routing (``profile.routing=full``), the routing plots and a per-expert table.

``nsr-megatron report RUN_DIR`` writes it from an existing run; ``nsr-megatron profile`` writes it at the end.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from nsr_megatron.telemetry.metrics import read_metrics
from nsr_megatron.telemetry.plots import plot_run
from nsr_megatron.telemetry.routing import ROUTING_FILE
from nsr_megatron.telemetry.summary import learning_summary

__all__ = ["write_report"]

# metrics summarised in the table: key -> label
_SUMMARY = {
    "reward/mean": "mean reward",
    "clip_frac": "clipped tokens",
    "rescue_frac": "rescued tokens",
    "entropy": "policy entropy",
    "routing/imbalance_max_mean": "expert load max / mean",
    "routing/imbalance_cv": "expert load CV",
    "routing/dead_expert_frac": "share of dead experts",
    "routing/entropy": "router entropy",
    "routing/topk_margin": "router top-k margin",
    "routing/drift_old_train": "drift old-log-prob vs training",
    "routing/drift_rollout_train": "drift rollout vs training",
    "routing/rescued_load_tv": "rescued vs overall expert load (TV)",
    "timing/step": "seconds per step",
}


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4g}" if values else "-"


def write_report(run_dir: str | Path) -> Path:
    """Draw the plots and write ``<run_dir>/report.md``; returns its path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    plots = plot_run(run_dir)
    routing = (run_dir / ROUTING_FILE).exists() and (run_dir / ROUTING_FILE).stat().st_size > 0
    if routing:
        from nsr_megatron.telemetry.routing_plots import plot_routing, routing_totals

        plots += plot_routing(run_dir)
    lines = [f"# Run report: {run_dir.name}", "", f"{len(rows)} steps; "
             f"{learning_summary([r['reward/mean'] for r in rows]).line() if rows else 'no steps logged'}.", "",
             "| metric | first step | last step | mean over the run |", "|---|---|---|---|"]
    for key, label in _SUMMARY.items():
        values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            lines.append(f"| {label} (`{key}`) | {values[0]:.4g} | {values[-1]:.4g} | {_mean(values)} |")
    if routing:
        totals = routing_totals(run_dir)
        load, clipped, rescued = (totals[k].sum(0) for k in ("load", "clipped", "rescued"))
        lines += ["", "## Experts (all MoE layers, the whole run)", "",
                  "| expert | share of routed tokens | share of clipped tokens | share of rescued tokens |",
                  "|---|---|---|---|"]
        for e in range(load.shape[0]):
            def share(t: object, _e: int = e) -> str:
                total = float(t.sum())  # type: ignore[attr-defined]
                return f"{float(t[_e]) / total:.3f}" if total else "-"  # type: ignore[index]

            lines.append(f"| {e} | {share(load)} | {share(clipped)} | {share(rescued)} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}]({p.relative_to(run_dir)})" for p in plots]
    trace = sorted((run_dir / "trace").glob("*.json")) if (run_dir / "trace").is_dir() else []
    if trace:
        lines += ["", "## Trace", "", f"`{trace[-1].relative_to(run_dir)}`: open it in https://ui.perfetto.dev or in "
                  "TensorBoard (`tensorboard --logdir " + str(run_dir / "trace") + "`); the phases are the ranges "
                  "`nsr/rollout`, `nsr/rewards`, `nsr/logprobs`, `nsr/train`, `nsr/weight_sync`."]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
