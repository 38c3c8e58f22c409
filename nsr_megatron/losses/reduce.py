"""Distributed reductions for the losses: global denominators, global statistics, per-sequence sums.

The losses are pure tensor functions; the trainer makes their denominators and statistics *global* with
these helpers. Process groups are arguments (no megatron import): pass the orthogonal groups whose ranks
hold *different* tokens, e.g. ``[dp_group, cp_group]`` (all-reducing over each in turn sums over their
product). Never the tensor-parallel group: its ranks hold copies of the same tokens.

Shape legend: B sequences of a micro-batch, P per-sequence quantities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from nsr_megatron.losses.policy import SeqSumFn

__all__ = ["global_statistics", "global_sums", "seq_sum_fn", "summarize_metrics"]

Groups = Sequence[dist.ProcessGroup | None]


def _world(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def global_sums(
    values: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]], groups: Groups = ()
) -> dict[str, Tensor]:
    """Sum scalar entries over micro-batches, then over the ranks of every group (all-reduce SUM).

    ``values`` is one dict or one dict per micro-batch (a key missing from a micro-batch counts 0). All
    entries travel in one flattened float64 tensor, one collective per group; every rank must hold the
    same keys. Used before the forward-backward for the denominators of
    :func:`nsr_megatron.losses.policy.loss_denominators` (-> ``global_num_tokens=sums["tokens"]``,
    ``global_num_seqs=sums["seqs"]``) and after it for the metric sums of
    :func:`nsr_megatron.losses.policy.policy_loss`. A ``None`` group is the default (world) group.
    """
    items = [values] if isinstance(values, Mapping) else list(values)
    keys = sorted(set().union(*(item.keys() for item in items)))
    if not keys:
        return {}
    device = next(iter(items[0].values())).device
    flat = torch.zeros(len(keys), dtype=torch.float64, device=device)  # [len(keys)]
    for item in items:
        flat += torch.stack(
            [torch.as_tensor(item.get(k, 0.0), dtype=torch.float64, device=device).reshape(()) for k in keys]
        )
    for group in groups:
        if _world(group) > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, flat.unbind(), strict=True))


def seq_sum_fn(group: dist.ProcessGroup | None) -> SeqSumFn | None:
    """The ``seq_sum_fn`` for :func:`~nsr_megatron.losses.policy.policy_loss` under context parallelism.

    Returns a function that sums a per-sequence [B, P] tensor over ``group`` (the context-parallel group,
    whose ranks hold slices of the same sequences) and leaves its input untouched; None when the group
    has one rank. It is forward-only: the loss needs the sums as values, not gradients through them.
    """
    if group is None or _world(group) == 1:
        return None

    def _sum(per_seq: Tensor) -> Tensor:  # [B, P]
        out = per_seq.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    return _sum


def global_statistics(
    values: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]], groups: Groups = ()
) -> dict[str, float]:
    """:func:`summarize_metrics` of :func:`global_sums`: the step's global loss statistics."""
    return summarize_metrics(global_sums(values, groups))


def summarize_metrics(sums: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Turn (globally reduced) sums of :func:`.policy.policy_loss` into the statistics of docs/LOSSES.md.

    Fractions are over the counted tokens (``tokens``), or for ``seq/`` keys over sequences (``seqs``; a
    sequence counts its fraction of tokens that are clipped / rescued, which is 0 or 1 for GSPO with one
    advantage per sequence). ``rescue_frac_of_clipped`` is over clipped tokens; ``rescue/grad_mass`` is the
    share of the gradient mass that hard clipping drops (``sum over C of |A| r w``, w the TIS weight) that
    the rescue restores; ``rescue/expected_frac`` is ``sum p`` over the clipped tokens (what NSR rescues on
    average; also reported without rescue). With ``rescue='decay'`` the rescue counts are expectations
    (sums of ``p``). ``ratio_hist/<side>/<e>`` is the fraction of tokens whose distance
    past that boundary, in units of eps, lies in ``[e, next edge)`` (the last bin is open).
    ``mis/zeroed_frac`` (``mis_mode='zero'``, IcePop) is over the counted tokens, which include the zeroed ones;
    ``sapo/grad_weight_mean`` is SAPO's mean gradient weight ``4 s (1 - s)`` (1 = unclipped); ``cov/band_frac``
    and ``cov/selected_frac`` are Clip-Cov's candidates and the tokens Clip-Cov / KL-Cov chose.
    """
    s = {k: float(v) for k, v in sums.items()}
    tokens, seqs = s.get("tokens", 0.0), s.get("seqs", 0.0)

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else 0.0

    def total(prefix: str) -> float:
        return s.get(f"{prefix}/upper_sum", 0.0) + s.get(f"{prefix}/lower_sum", 0.0)

    out: dict[str, float] = {"tokens": tokens, "seqs": seqs}
    names = {
        "clip/upper_sum": "clip_frac/upper",
        "clip/lower_sum": "clip_frac/lower",
        "clip/dual_sum": "clip_frac/dual",
        "band/upper_sum": "band_frac/upper",
        "band/lower_sum": "band_frac/lower",
        "rescue/upper_sum": "rescue_frac/upper",
        "rescue/lower_sum": "rescue_frac/lower",
        "rescue/p_sum": "rescue/expected_frac",
        "ratio/abs_dev_sum": "ratio/mean_abs_dev",
        "kl_old_sum": "kl_old",
        "entropy_sum": "entropy",
        "kl_ref_sum": "kl_ref",
        "tis/weight_sum": "tis/weight_mean",
        "tis/capped_sum": "tis/clip_frac",
        "mis/zeroed_sum": "mis/zeroed_frac",
        "sapo/grad_weight_sum": "sapo/grad_weight_mean",
        "cov/band_sum": "cov/band_frac",
        "cov/selected_sum": "cov/selected_frac",
    }
    seq_names = {
        "seq/clip/upper_sum": "seq/clip_frac/upper",
        "seq/clip/lower_sum": "seq/clip_frac/lower",
        "seq/band_sum": "seq/band_frac",
        "seq/rescue/upper_sum": "seq/rescue_frac/upper",
        "seq/rescue/lower_sum": "seq/rescue_frac/lower",
        "seq/ratio/abs_dev_sum": "seq/ratio/mean_abs_dev",
    }
    for key, value in s.items():
        if key in names:
            out[names[key]] = ratio(value, tokens)
        elif key in seq_names:
            out[seq_names[key]] = ratio(value, seqs)
        elif key.startswith("ratio_hist/"):
            out[key.removesuffix("_sum")] = ratio(value, tokens)
    out["clip_frac"] = ratio(total("clip"), tokens)
    out["rescue_frac"] = ratio(total("rescue"), tokens)  # always logged (0 for CISPO, which drops nothing)
    if "rescue/upper_sum" in s:
        out["band_frac"] = ratio(total("band"), tokens)
        out["rescue_frac_of_clipped"] = ratio(total("rescue"), total("clip"))
        out["rescue/grad_mass"] = ratio(s["rescue/grad_mass_sum"], s.get("clip/grad_mass_sum", 0.0))
    if "mis/masked_sum" in s:
        out["mis/masked_frac"] = ratio(s["mis/masked_sum"], tokens + s["mis/masked_sum"])
    if "seq/clip/upper_sum" in s:
        out["seq/clip_frac"] = ratio(total("seq/clip"), seqs)
    if "seq/rescue/upper_sum" in s:
        out["seq/rescue_frac"] = ratio(total("seq/rescue"), seqs)
    return out
