"""PNG plots of a run's MoE routing (``profile.routing=full``), from ``routing.jsonl`` and ``metrics.jsonl``.

- ``routing_load.png``: expert x layer heatmap of each layer's share of routed tokens per expert, over the run
  (a uniform router gives 1/E everywhere);
- ``routing_drift.png``: the share of tokens whose top-k set changed between the old-log-prob and training
  forwards, and between rollout and training, per step;
- ``routing_rescue.png``: per expert, its share of all routed tokens against its share of the tokens the loss
  clipped and of those NSR rescued (all layers, the whole run): where rescue moves gradient.

Drawn with ``matplotlib.figure.Figure`` (no pyplot, no global backend), like :mod:`.plots`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nsr_megatron.telemetry.metrics import read_metrics
from nsr_megatron.telemetry.plots import PLOTS_DIR, series
from nsr_megatron.telemetry.routing import read_routing

__all__ = ["plot_routing", "routing_totals"]


def routing_totals(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """Per-layer, per-expert counts of the whole run: ``load``, ``band``, ``clipped``, ``rescued`` [L, E]."""
    rows = read_routing(run_dir)
    if not rows:
        raise FileNotFoundError(f"{Path(run_dir) / 'routing.jsonl'} has no steps; run with profile.routing=full.")
    out = {}
    for key in ("load", "band", "clipped", "rescued"):
        out[key] = torch.tensor([[layer[key] for layer in row["layers"]] for row in rows],
                                dtype=torch.float64).sum(0)
    return out


def plot_routing(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the three routing plots into ``out_dir`` (default ``<run_dir>/plots``); returns the files."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    totals = routing_totals(run_dir)
    written = []

    load = totals["load"]
    share = load / load.sum(dim=1, keepdim=True).clamp(min=1)
    fig = Figure(figsize=(7.0, 1.2 + 0.45 * share.shape[0]), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("Share of each layer's routed tokens per expert (whole run)")
    fig.colorbar(im, ax=ax, label="share")
    written.append(out / "routing_load.png")
    fig.savefig(written[-1], format="png")

    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    fig = Figure(figsize=(7.0, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("routing/drift_old_train", "old-log-prob forward vs training"),
                       ("routing/drift_rollout_train", "rollout engine vs training")):
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
    ax.set_title("Routing drift: share of tokens whose top-k experts changed")
    ax.set_xlabel("step")
    ax.set_ylabel("share of tokens")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    written.append(out / "routing_drift.png")
    fig.savefig(written[-1], format="png")

    experts = torch.arange(load.shape[1])
    fig = Figure(figsize=(7.0, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    width = 0.27
    for i, (key, label) in enumerate((("load", "all routed tokens"), ("clipped", "clipped tokens"),
                                      ("rescued", "rescued tokens"))):
        counts = totals[key].sum(0)
        ax.bar((experts + (i - 1) * width).numpy(), (counts / counts.sum().clamp(min=1)).numpy(), width, label=label)
    ax.set_title("Where clipped and rescued tokens are routed (all layers, whole run)")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of the tokens' expert choices")
    ax.legend(fontsize="small")
    written.append(out / "routing_rescue.png")
    fig.savefig(written[-1], format="png")
    return written
