"""MoE routing statistics: the pure, layout-free part of the routing profiler (no megatron, no process groups).

Everything is a sum or a count over tokens, so every rank contributes its share and a plain sum over ranks gives
the global value (``nsr_megatron.models.routing`` does the capture and the reduction). Per step, for L MoE layers
and E experts, a :class:`RoutingSums` holds:

- ``load`` [L, E]: tokens routed to each expert in the training forward (each token counts once per chosen expert);
- ``tokens`` [L]: tokens routed; ``entropy_sum`` [L]: sum over tokens of the router distribution's entropy
  ``-sum_e p_e log p_e`` (softmax of the router logits); ``margin_sum`` [L]: sum over tokens of
  ``p_(k) - p_(k+1)``, the gap between the last chosen and the first unchosen expert (small: fragile routing);
- ``drift_old`` [L, 2]: (tokens whose top-k set differs between the old-log-prob forward and the training forward,
  tokens compared); ``drift_rollout`` [L, 2]: the same between the rollout engine's routing and training;
- ``band`` / ``clipped`` / ``rescued`` [L, E] (``full`` mode): for tokens the loss saw near the clip boundary,
  clipped, and rescued, how often each expert was among their top-k.

:func:`routing_metrics` turns the sums into the ``routing/*`` scalars: load imbalance as max/mean and coefficient
of variation of each layer's expert load and the share of experts that got no token (averaged over layers), mean
router entropy and top-k margin, and the two drift shares.

Shape legend: N tokens, E experts, k experts per token, L MoE layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ROUTING_FILE",
    "RoutingLog",
    "RoutingSums",
    "expert_load",
    "read_routing",
    "router_entropy_and_margin",
    "routing_metrics",
    "topk_changed",
]


@dataclass
class RoutingSums:
    """Additive routing statistics of one step (see the module docstring); float64 tensors."""

    load: torch.Tensor  # [L, E]
    tokens: torch.Tensor  # [L]
    entropy_sum: torch.Tensor  # [L]
    margin_sum: torch.Tensor  # [L]
    drift_old: torch.Tensor  # [L, 2] (changed, compared)
    drift_rollout: torch.Tensor  # [L, 2]
    band: torch.Tensor  # [L, E]
    clipped: torch.Tensor  # [L, E]
    rescued: torch.Tensor  # [L, E]

    @classmethod
    def zeros(cls, layers: int, experts: int) -> RoutingSums:
        f = torch.float64
        return cls(load=torch.zeros(layers, experts, dtype=f), tokens=torch.zeros(layers, dtype=f),
                   entropy_sum=torch.zeros(layers, dtype=f), margin_sum=torch.zeros(layers, dtype=f),
                   drift_old=torch.zeros(layers, 2, dtype=f), drift_rollout=torch.zeros(layers, 2, dtype=f),
                   band=torch.zeros(layers, experts, dtype=f), clipped=torch.zeros(layers, experts, dtype=f),
                   rescued=torch.zeros(layers, experts, dtype=f))

    def flat(self) -> torch.Tensor:
        """All sums in one 1-D tensor (one collective reduces them all)."""
        return torch.cat([getattr(self, f.name).reshape(-1) for f in fields(self)])

    def load_flat(self, flat: torch.Tensor) -> None:
        start = 0
        for f in fields(self):
            t = getattr(self, f.name)
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()


def expert_load(topk: torch.Tensor, experts: int) -> torch.Tensor:
    """[E] float64: how many of the tokens' top-k choices (``topk`` [N, k] int) went to each expert."""
    return torch.bincount(topk.reshape(-1).long(), minlength=experts).to(torch.float64)


def router_entropy_and_margin(logits: torch.Tensor, k: int, *, score_function: str = "softmax",
                              expert_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy [N], top-k margin [N]) of the router's distribution over experts (``logits`` [N, E]).

    ``softmax`` routers (Qwen3-MoE, gpt-oss): the softmax of the logits; the margin is the k-th minus the
    (k+1)-th probability. ``sigmoid`` routers (DeepSeek-V3, GLM-4.5): the scores ``s = sigmoid(logits)``
    normalized to sum to 1 give the entropy; experts are chosen by ``s + expert_bias``, so the margin is the k-th
    minus the (k+1)-th of those selection scores (group-limited routing is not taken into account)."""
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits.double())
        p = scores / scores.sum(-1, keepdim=True)
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
        select = scores + expert_bias.double() if expert_bias is not None else scores
    elif score_function == "softmax":
        logp = torch.log_softmax(logits.double(), dim=-1)  # [N, E]
        select = logp.exp()
        entropy = -(select * logp).sum(-1)
    else:
        raise ValueError(f"router score_function={score_function!r}: expected 'softmax' or 'sigmoid'")
    top = torch.topk(select, min(k + 1, select.shape[-1]), dim=-1).values  # [N, k+1]
    margin = top[:, k - 1] - top[:, k] if top.shape[-1] > k else top[:, k - 1]
    return entropy, margin


def topk_changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] bool: whether token n's set of chosen experts differs between ``a`` and ``b`` (both [N, k]; the order
    within a set does not matter)."""
    return (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)


def routing_metrics(sums: RoutingSums) -> dict[str, float]:
    """The ``routing/*`` scalars of a step's (globally reduced) sums; layers that routed no token are left out."""
    active = sums.tokens > 0
    if not bool(active.any()):
        return {}
    load = sums.load[active]  # [L', E]
    mean = load.mean(dim=-1)  # [L']
    out: dict[str, Any] = {
        "routing/imbalance_max_mean": float((load.max(dim=-1).values / mean).mean()),
        "routing/imbalance_cv": float((load.std(dim=-1, unbiased=False) / mean).mean()),
        "routing/dead_expert_frac": float((load == 0).double().mean()),
        "routing/entropy": float(sums.entropy_sum[active].sum() / sums.tokens[active].sum()),
        "routing/topk_margin": float(sums.margin_sum[active].sum() / sums.tokens[active].sum()),
    }
    for key, drift in (("routing/drift_old_train", sums.drift_old), ("routing/drift_rollout_train",
                                                                    sums.drift_rollout)):
        if float(drift[:, 1].sum()) > 0:
            out[key] = float(drift[:, 0].sum() / drift[:, 1].sum())
    for key, counts in (("band", sums.band), ("clipped", sums.clipped), ("rescued", sums.rescued)):
        total = float(counts.sum())
        if total > 0:  # how concentrated these tokens' experts are, against the overall load
            share = counts.sum(0) / total  # [E]
            overall = sums.load.sum(0) / sums.load.sum()
            out[f"routing/{key}_load_tv"] = float(0.5 * (share - overall).abs().sum())
    return out


ROUTING_FILE = "routing.jsonl"


class RoutingLog:
    """``<run_dir>/routing.jsonl``: one line per step with each MoE layer's per-expert counts::

        {"step": 3, "layers": [{"layer": 0, "tokens": 512, "load": [...E], "band": [...], "clipped": [...],
                                "rescued": [...], "entropy": 1.9, "topk_margin": 0.05, "drift_old": 0.01,
                                "drift_rollout": null}, ...]}

    ``layer`` counts the MoE layers from 0. Resuming at step S drops the lines after S (the run redoes them).
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / ROUTING_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line)["step"]) <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, sums: RoutingSums) -> None:
        layers = []
        for i in range(sums.load.shape[0]):
            n = float(sums.tokens[i])
            layers.append({
                "layer": i, "tokens": n, "load": sums.load[i].tolist(), "band": sums.band[i].tolist(),
                "clipped": sums.clipped[i].tolist(), "rescued": sums.rescued[i].tolist(),
                "entropy": float(sums.entropy_sum[i]) / n if n else None,
                "topk_margin": float(sums.margin_sum[i]) / n if n else None,
                "drift_old": _share(sums.drift_old[i]), "drift_rollout": _share(sums.drift_rollout[i]),
            })
        self._file.write(json.dumps({"step": step, "layers": layers}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _share(pair: torch.Tensor) -> float | None:
    return float(pair[0] / pair[1]) if float(pair[1]) > 0 else None


def read_routing(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of ``<run_dir>/routing.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / ROUTING_FILE
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
