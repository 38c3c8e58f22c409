"""Policy-gradient losses for RLVR: PPO/GRPO clip, DAPO, GSPO(-token), CISPO and NSR (see LOSSES.md).

Notation (per response token): ``r = exp(logp - old)`` (difference in fp32, clamped to ``+-LOG_RATIO_LIMIT``
= 20 before the ``exp``), ``A`` the advantage, ``m`` the
response mask, ``lo = 1 - eps_low``, ``hi = 1 + eps_high``, ``sg`` = stop-gradient. Every clipped
surrogate is written as ``L = -A * rho`` with an *effective ratio*
``rho = v + w * sg(r) * (logp - sg(logp))``: its value is ``v`` and its gradient ``w * r * grad(logp)``;
the variants only choose ``v`` and ``w``:

- clip (PPO / GRPO / DAPO): the clipped set is ``C = {A > 0, r > hi} u {A < 0, r < lo}``; on ``C``
  ``v = clip(r, lo, hi), w = 0`` (the value of ``max(-A r, -A clip(r))`` and no gradient), elsewhere
  ``v = r, w = 1``. Dual clip (c > 1): for ``A < 0`` and ``r > c``, ``v = c, w = 0`` (``L = min(L, -c A)``).
- GSPO (arXiv 2507.18071): ``s_i = exp(mean_t (logp - old))`` replaces ``r`` for every token of response
  ``i`` (GSPO-token form: value ``s_i``, gradient ``s_i * grad(logp_t)``). With a per-sequence advantage
  and the aggregations below (uniform weight within a sequence) this is *exactly* GSPO's gradient, and the
  sequence mean is needed only as a value, so under context parallelism ``seq_sum_fn`` is a plain all-reduce.
- CISPO (arXiv 2506.13585): ``L = -sg(clip(r, lo, hi)) * A * logp`` (no token is dropped).
- NSR (this project, arXiv 2605.22703): each token of ``C`` on the configured ``sides`` gets a rescue
  probability ``p(r)``; ``rescue="stochastic"`` draws the decision with a counter-based hash of
  (seed, step, sample id, token index) (:mod:`.rng`) and a rescued token gets ``v = r, w = 1`` (or the noisy
  ratio ``v = u r, w = u``): the unclipped ``-A r grad(logp)``. ``rescue="decay"`` sets ``w = p`` and keeps
  ``v = clip(r)``: ``L_clip + sg(p) (-A) (r - sg(r))``, the deterministic ablation with the same expected
  gradient. Only the K clipped tokens are touched (gathered), so NSR costs no extra pass over the batch.

Rescue profiles, with ``d`` the relative overshoot past the boundary (``r / hi - 1`` above,
``1 - r / lo`` below):
``noise``: ``u ~ U(1 - sigma, 1 + sigma)``, rescued iff ``u * r`` lands in ``[lo, hi]``, so
``p(r) = |[lo / r, hi / r] n [1 - sigma, 1 + sigma]| / (2 sigma)`` (upper side:
``clamp((hi / r - (1 - sigma)) / (2 sigma), 0, 1)``, 1/2 at the boundary); ``constant``: ``p0`` for
``d <= delta``; ``linear``: ``p0 * (1 - d / delta)``; ``widening``: 1 for ``d <= delta`` (the control that
equals clip-higher with a wider eps).

Then ``L_tok = -A * rho``, times the TIS weight ``min(exp(old - rollout), tis_cap)``, plus
``kl_coef * KL(ref)``. MIS removes tokens with ``exp(old - rollout)`` outside ``[mis_low, mis_high]`` from
the mask *and* from the denominators. Aggregations (``N`` tokens, ``S`` sequences of the *global* batch,
``T_i`` response length of sequence ``i`` over all context-parallel ranks, ``L`` = ``max_length``):
``token-mean``: ``sum(m L) / N``; ``seq-mean-token-mean``: ``sum_i (sum_t m L) / T_i / S``;
``seq-mean-token-sum``: ``sum(m L) / S``; ``seq-mean-token-sum-norm`` (Dr.GRPO): ``sum(m L) / (L S)``.

The returned ``loss`` is this call's additive share: summed over micro-batches and over data- and
context-parallel ranks it is the global loss, so gradients must be *summed* across those ranks (not
averaged) when ``global_num_tokens`` / ``global_num_seqs`` come from :func:`loss_denominators` reduced with
:func:`nsr_megatron.losses.reduce.global_sums`.

Shape legend: B rows (sequences) of this micro-batch on this rank; T token columns on this rank (a
context-parallel rank holds a slice of every sequence); K clipped tokens gathered for rescue; E histogram
edges.
"""

from __future__ import annotations

import itertools
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

from nsr_megatron.losses.rng import SEQUENCE_INDEX, row_keys, uniform_from_keys

__all__ = [
    "LOG_RATIO_LIMIT",
    "PRESETS",
    "PolicyLossConfig",
    "loss_denominators",
    "policy_loss",
    "rescue_probability",
]

Surrogate = Literal["clip", "cispo"]
RatioLevel = Literal["token", "sequence", "sequence-token"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
Rescue = Literal["off", "stochastic", "decay"]
Profile = Literal["noise", "constant", "linear", "widening"]
Sides = Literal["both", "upper", "lower"]
RescueLevel = Literal["token", "sequence"]
RescuedValue = Literal["ratio", "noisy_ratio"]
KLEstimator = Literal["k1", "k3", "low-var-k3"]
SeqSumFn = Callable[[Tensor], Tensor]

_BASE: dict[str, Any] = {
    "surrogate": "clip",
    "ratio_level": "token",
    "eps_low": 0.2,
    "eps_high": 0.28,
    "dual_clip": None,
    "aggregation": "token-mean",
    "max_length": None,
    "rescue": "off",
    "profile": "noise",
    "sigma": 0.1,
    "delta": 0.1,
    "p0": 0.5,
    "sides": "both",
    "rescue_level": "token",
    "rescued_value": "ratio",
    "seed": 0,
    "tis_cap": None,
    "mis_low": None,
    "mis_high": None,
    "kl_coef": 0.0,
    "kl_estimator": "low-var-k3",
    "hist_edges": (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0),
}
# GSPO's eps are relative to a sequence-mean ratio; the NSR band is scaled to about half an eps, as at
# token level (sigma = 0.1 against eps_high = 0.28). The paper does not publish these values.
_GSPO: dict[str, Any] = {
    "ratio_level": "sequence",
    "eps_low": 3e-4,
    "eps_high": 4e-4,
    "aggregation": "seq-mean-token-mean",
    "sigma": 2e-4,
    "delta": 2e-4,
    "rescue_level": "sequence",
}

PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {**_BASE, "eps_high": 0.2, "aggregation": "seq-mean-token-mean"},
    "dapo": dict(_BASE),
    "gspo": {**_BASE, **_GSPO},
    "gspo-token": {**_BASE, **_GSPO, "ratio_level": "sequence-token"},
    "cispo": {**_BASE, "surrogate": "cispo", "eps_low": 1.0},
    "nsr": {**_BASE, "rescue": "stochastic"},
    "nsr-decay": {**_BASE, "rescue": "decay"},
    "nsr-widen": {**_BASE, "rescue": "stochastic", "profile": "widening"},
    "nsr-gspo": {**_BASE, **_GSPO, "rescue": "stochastic"},
    "nsr-gspo-decay": {**_BASE, **_GSPO, "rescue": "decay"},
}
"""Every loss by name: a complete value for every field of :class:`PolicyLossConfig` but ``name``."""

LOG_RATIO_LIMIT = 20.0
"""Log-ratios (``logp - old``, and ``old - rollout`` for TIS / MIS) are clamped to ``[-20, 20]`` before ``exp``:
ratios stay within ``[2.1e-9, 4.9e8]`` and finite in fp32. Clip and rescue decisions are unchanged (they happen
near 1); only a token whose log-ratio lies past the limit sees its ratio value capped (its gradient, if any,
is ``r * d logp`` with the capped ``r``)."""

_PRESET: Any = None  # a field left at this default takes the value of the preset ``name``

_NSR_KNOBS = ("profile", "sigma", "delta", "p0", "sides", "rescue_level", "rescued_value", "seed")


@dataclass(kw_only=True)
class PolicyLossConfig:
    """Which policy loss and all its knobs (LOSSES.md). Fields left unset take the preset ``name``'s value.

    ``PolicyLossConfig(name="nsr", sigma=0.05)`` is the ``nsr`` preset with ``sigma`` overridden; the
    presets are :data:`PRESETS`. A knob that the chosen loss ignores and that differs from the preset warns.
    ``hist_edges`` are in units of eps past each boundary: ``(r - hi) / eps_high`` above,
    ``(lo - r) / eps_low`` below; bin k counts ``[edges[k], edges[k+1])``, the last bin is open.
    """

    name: str = "nsr"
    surrogate: Surrogate = _PRESET
    ratio_level: RatioLevel = _PRESET
    eps_low: float = _PRESET
    eps_high: float = _PRESET
    dual_clip: float | None = _PRESET
    aggregation: Aggregation = _PRESET
    max_length: int | None = _PRESET
    rescue: Rescue = _PRESET
    profile: Profile = _PRESET
    sigma: float = _PRESET
    delta: float = _PRESET
    p0: float = _PRESET
    sides: Sides = _PRESET
    rescue_level: RescueLevel = _PRESET
    rescued_value: RescuedValue = _PRESET
    seed: int = _PRESET
    tis_cap: float | None = _PRESET
    mis_low: float | None = _PRESET
    mis_high: float | None = _PRESET
    kl_coef: float = _PRESET
    kl_estimator: KLEstimator = _PRESET
    hist_edges: tuple[float, ...] = _PRESET

    def __post_init__(self) -> None:
        if self.name not in PRESETS:
            raise ValueError(
                f"PolicyLossConfig.name={self.name!r} is not a known loss; valid names: "
                f"{', '.join(sorted(PRESETS))}."
            )
        preset = PRESETS[self.name]
        explicit: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and value is None:
                setattr(self, f.name, preset[f.name])
            elif f.name != "name":
                explicit[f.name] = value
        if isinstance(self.hist_edges, list):
            self.hist_edges = tuple(self.hist_edges)
        self._validate()
        for key, why in sorted(self._ignored().items()):
            if key in explicit and explicit[key] != preset[key]:
                warnings.warn(
                    f"PolicyLossConfig.{key}={explicit[key]!r} is ignored by loss {self.name!r} ({why}); "
                    "remove it or change that setting.",
                    UserWarning,
                    stacklevel=3,
                )

    def _validate(self) -> None:
        hints = typing.get_type_hints(PolicyLossConfig)
        for f in fields(self):
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"PolicyLossConfig.{f.name}={getattr(self, f.name)!r} is not one of "
                    f"{', '.join(map(repr, choices))}; pick one of those."
                )
        v, real = self, (int, float)
        # fmt: off
        checks: list[tuple[str, bool, str, str]] = [  # (field, valid?, reason, fix)
            ("eps_low", isinstance(v.eps_low, real) and 0.0 < v.eps_low <= 1.0,
             "must be in (0, 1] (the lower bound is 1 - eps_low >= 0)", "use e.g. 0.2"),
            ("eps_high", isinstance(v.eps_high, real) and 0.0 < v.eps_high,
             "must be > 0", "use e.g. 0.28 (DAPO) or 4e-4 (GSPO)"),
            ("dual_clip", v.dual_clip is None or (isinstance(v.dual_clip, real) and v.dual_clip > 1.0),
             "must be > 1 (it caps -A*r at -c*A for A < 0)", "use e.g. 3.0, or None (off)"),
            ("max_length", v.aggregation != "seq-mean-token-sum-norm"
             or (isinstance(v.max_length, int) and v.max_length > 0),
             "must be a positive int with aggregation='seq-mean-token-sum-norm'",
             "set it to the maximum response length"),
            ("sigma", isinstance(v.sigma, real) and 0.0 < v.sigma < 1.0,
             "must be in (0, 1) (the noise is u ~ U(1 - sigma, 1 + sigma))", "use e.g. 0.1"),
            ("delta", isinstance(v.delta, real) and 0.0 < v.delta,
             "must be > 0 (the band's relative width past the boundary)", "use e.g. 0.1"),
            ("p0", isinstance(v.p0, real) and 0.0 < v.p0 <= 1.0,
             "must be in (0, 1] (a probability)", "use e.g. 0.5"),
            ("seed", isinstance(v.seed, int), "must be an int", "use e.g. 0"),
            ("tis_cap", v.tis_cap is None or (isinstance(v.tis_cap, real) and v.tis_cap > 0.0),
             "must be > 0", "use e.g. 2.0, or None (off)"),
            ("mis_low", v.mis_low is None or (isinstance(v.mis_low, real) and v.mis_low >= 0.0),
             "must be >= 0", "use e.g. 0.5, or None (no lower bound)"),
            ("mis_high", v.mis_high is None or (isinstance(v.mis_high, real) and v.mis_high > 0.0),
             "must be > 0", "use e.g. 2.0, or None (no upper bound)"),
            ("mis_low", v.mis_low is None or v.mis_high is None or v.mis_low < v.mis_high,
             f"must be below mis_high={v.mis_high!r}", "swap or widen the bounds"),
            ("kl_coef", isinstance(v.kl_coef, real) and v.kl_coef >= 0.0,
             "must be >= 0", "use 0 (no KL penalty) or e.g. 1e-3"),
            ("hist_edges", isinstance(v.hist_edges, tuple) and 2 <= len(v.hist_edges) <= 64
             and all(isinstance(e, real) for e in v.hist_edges)
             and all(b > a for a, b in itertools.pairwise(v.hist_edges)),
             "must be 2 to 64 strictly increasing numbers", "use e.g. (-1, 0, 1)"),
            ("rescue", v.rescue == "off" or v.surrogate == "clip",
             "needs surrogate='clip' (CISPO never drops a token)", "use rescue='off'"),
            ("rescued_value", v.rescued_value == "ratio" or v.rescue != "stochastic" or v.profile == "noise",
             f"needs profile='noise' (profile={v.profile!r} draws no noise)", "use rescued_value='ratio'"),
        ]
        # fmt: on
        for key, ok, reason, fix in checks:
            if not ok:
                raise ValueError(f"PolicyLossConfig.{key}={getattr(self, key)!r} {reason}; {fix}.")

    def _ignored(self) -> dict[str, str]:
        """Fields this configuration does not use -> why."""
        ignored: dict[str, str] = {}
        if self.rescue == "off":
            ignored.update(dict.fromkeys(_NSR_KNOBS, "rescue='off'"))
        else:
            unused = {"noise": ("delta", "p0"), "widening": ("sigma", "p0")}.get(self.profile, ("sigma",))
            ignored.update(dict.fromkeys(unused, f"profile={self.profile!r}"))
            if self.rescue == "decay":
                ignored.update(
                    dict.fromkeys(("seed", "rescue_level", "rescued_value"), "rescue='decay' draws nothing")
                )
        if self.surrogate == "cispo":
            ignored["dual_clip"] = "surrogate='cispo' never clips the loss"
        if self.aggregation != "seq-mean-token-sum-norm":
            ignored["max_length"] = f"aggregation={self.aggregation!r}"
        return ignored


# ---------------------------------------------------------------------------------------------------------
# Rescue probability


def rescue_probability(cfg: PolicyLossConfig, ratio: Tensor, upper: Tensor) -> Tensor:
    """``p(r)`` for clipped ratios: ``ratio`` [S] past the upper (``upper`` True) or lower boundary.

    See the module docstring for the profiles; ``p`` is 0 outside the boundary band. Computed in the dtype
    of ``ratio`` (the loss passes float64).
    """
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    if cfg.profile == "noise":
        start = torch.clamp(lo / ratio, min=1.0 - cfg.sigma)
        end = torch.clamp(hi / ratio, max=1.0 + cfg.sigma)
        return ((end - start) / (2.0 * cfg.sigma)).clamp(0.0, 1.0)
    overshoot = torch.where(upper, ratio / hi - 1.0, 1.0 - ratio / lo)  # d >= 0 on clipped tokens
    inside = overshoot <= cfg.delta
    if cfg.profile == "constant":
        p = torch.full_like(ratio, cfg.p0)
    elif cfg.profile == "linear":
        p = cfg.p0 * (1.0 - overshoot / cfg.delta)
    else:  # widening
        p = torch.ones_like(ratio)
    return torch.where(inside, p, torch.zeros_like(p))


# ---------------------------------------------------------------------------------------------------------
# Masks and denominators


def _effective_mask(
    cfg: PolicyLossConfig,
    mask: Tensor,
    old_logprobs: Tensor | None,
    rollout_logprobs: Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """(mask after MIS [B, T] float, TIS weight [B, T] or None, MIS/TIS metric sums)."""
    m = mask.to(dtype)  # [B, T]
    stats: dict[str, Tensor] = {}
    mis = cfg.mis_low is not None or cfg.mis_high is not None
    if not mis and cfg.tis_cap is None:
        return m, None, stats
    if old_logprobs is None or rollout_logprobs is None:
        raise ValueError(
            "tis_cap / mis_low / mis_high need rollout_logprobs (and old_logprobs) [B, T]; pass the rollout "
            "engine's log-probs or set them to None."
        )
    valid = mask.bool()
    log_w = torch.where(valid, old_logprobs.to(dtype) - rollout_logprobs.to(dtype), 0.0)  # [B, T]
    weight = torch.exp(log_w.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))  # [B, T]
    if mis:
        keep = torch.ones_like(valid)
        if cfg.mis_low is not None:
            keep &= weight >= cfg.mis_low
        if cfg.mis_high is not None:
            keep &= weight <= cfg.mis_high
        stats["mis/masked_sum"] = (m * ~keep).sum().to(torch.float64)
        m = m * keep
    if cfg.tis_cap is None:
        return m, None, stats
    stats["tis/capped_sum"] = (m * (weight > cfg.tis_cap)).sum().to(torch.float64)
    tis = weight.clamp(max=cfg.tis_cap)
    stats["tis/weight_sum"] = (m * tis).sum().to(torch.float64)
    return m, tis, stats


def _seq_sums(parts: list[Tensor], seq_sum_fn: SeqSumFn | None) -> Tensor:
    """Per-sequence sums [B, P] of this rank's parts, summed over context-parallel ranks by ``seq_sum_fn``."""
    sums = torch.stack([p.detach().sum(dim=1).to(torch.float64) for p in parts], dim=1)  # [B, P]
    return sums if seq_sum_fn is None else seq_sum_fn(sums)


def loss_denominators(
    cfg: PolicyLossConfig,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    seq_sum_fn: SeqSumFn | None = None,
) -> dict[str, Tensor]:
    """This micro-batch's share of the aggregation denominators, as float64 scalars.

    ``tokens = sum(m)`` and ``seqs = sum_i sum_t m / T_i`` (each non-empty sequence counts 1 in total over
    the context-parallel ranks that share it; ``T_i`` from ``seq_sum_fn``), with ``m`` the mask after MIS.
    Sum over micro-batches, all-reduce over data- and context-parallel ranks
    (:func:`nsr_megatron.losses.reduce.global_sums`) and pass as ``global_num_tokens`` / ``global_num_seqs``.
    """
    m, _, _ = _effective_mask(cfg, mask, old_logprobs, rollout_logprobs, torch.float32)  # [B, T]
    seq_tokens = _seq_sums([m], seq_sum_fn)[:, 0]  # [B]
    local = m.sum(dim=1).to(torch.float64)  # [B] (exact: integers below 2**24 per row)
    return {"tokens": local.sum(), "seqs": _safe_div(local, seq_tokens).sum()}


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def _kl(estimator: KLEstimator, log_ratio: Tensor) -> Tensor:
    """Per-token KL(pi || ref) estimate from samples of pi, given ``log_ratio = log(ref / pi)`` [B, T].

    k1 = -log_ratio; k3 = exp(log_ratio) - log_ratio - 1 (unbiased, >= 0, Schulman 2020); low-var-k3 is
    k3 with the log-ratio clamped to [-20, 20] and the result to <= 10.
    """
    if estimator == "k1":
        return -log_ratio
    if estimator == "low-var-k3":
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=10.0)
    return torch.exp(log_ratio) - log_ratio - 1.0


# ---------------------------------------------------------------------------------------------------------
# The loss


def policy_loss(
    cfg: PolicyLossConfig,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    sample_ids: Tensor | None = None,
    step: int | None = None,
    token_index: Tensor | None = None,
    global_num_tokens: Tensor | float | None = None,
    global_num_seqs: Tensor | float | None = None,
    seq_sum_fn: SeqSumFn | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    masks: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss of ``cfg`` on one micro-batch and its statistics as sums (module docstring).

    Args:
        logprobs: [B, T] log pi_theta of the response tokens (gradient flows through it).
        old_logprobs: [B, T] log pi_old (no gradient). ``mask``: [B, T] 1 for tokens that count.
        advantages: [B] (per sequence) or [B, T] (per token; not for ``ratio_level='sequence'``).
        sample_ids: [B] int64 unique id of each sample in the run; ``step``: the RL step. Both are needed
            by ``rescue='stochastic'`` (the draw hashes seed, step, sample id and token index).
        token_index: [B, T] int64 position of each token in its response (default: the column index);
            pass it when a sequence is split across context-parallel ranks.
        global_num_tokens / global_num_seqs: the global denominators (:func:`loss_denominators`, reduced);
            default: this micro-batch's own (correct for a single process and micro-batch).
        seq_sum_fn: sums a per-sequence [B, P] float64 tensor over the context-parallel ranks sharing the
            sequences (forward only); None when every rank holds whole sequences.
        ref_logprobs: [B, T] reference log-probs for the KL penalty / metric. ``rollout_logprobs``: [B, T]
            the rollout engine's log-probs for TIS / MIS. ``entropy``: [B, T] per-token entropy (metric).
        masks: a dict to fill with per-token bool masks [B, T]: ``clipped`` (hard clipping would drop the token),
            ``band`` (clipped, within the rescue band: p > 0) and ``rescued`` (rescued by the stochastic draw).

    Returns:
        ``(loss, sums)``: the scalar loss share and a dict of float64 scalar sums/counts to all-reduce
        (:func:`nsr_megatron.losses.reduce.global_sums`) and turn into statistics with
        :func:`nsr_megatron.losses.reduce.summarize_metrics`.
    """
    shape = logprobs.shape
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs has shape {tuple(shape)}; expected [B, T] (rows = sequences).")
    others = {"old_logprobs": old_logprobs, "mask": mask, "token_index": token_index, "entropy": entropy}
    for name, x in {**others, "ref_logprobs": ref_logprobs, "rollout_logprobs": rollout_logprobs}.items():
        if x is not None and x.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected {tuple(shape)} like logprobs [B, T]."
            )
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B]={tuple(shape[:1])} or "
            f"[B, T]={tuple(shape)}."
        )
    if cfg.ratio_level == "sequence" and advantages.dim() == 2:
        raise ValueError(
            "ratio_level='sequence' (GSPO) uses one advantage per sequence: pass advantages of shape [B], "
            "or use name='gspo-token' (ratio_level='sequence-token') for per-token advantages."
        )
    stochastic = cfg.rescue == "stochastic" and cfg.surrogate == "clip"
    if stochastic and (sample_ids is None or step is None):
        raise ValueError(
            "rescue='stochastic' needs sample_ids [B] (int64) and step: each draw is a hash of "
            "(seed, step, sample id, token index), so pass both."
        )
    if sample_ids is not None and sample_ids.shape != shape[:1]:
        raise ValueError(f"sample_ids has shape {tuple(sample_ids.shape)}; expected [B]={tuple(shape[:1])}.")
    if cfg.kl_coef > 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logprobs [B, T]; pass them or set kl_coef=0.")

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    f64 = torch.float64
    m, tis, sums = _effective_mask(cfg, mask, old_logprobs, rollout_logprobs, dtype)  # [B, T]
    valid = m > 0  # [B, T]
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    seq_level = cfg.ratio_level != "token"

    logratio = torch.where(valid, logprobs.to(dtype) - old_logprobs.to(dtype), 0.0)  # [B, T]
    live = logratio - logratio.detach()  # [B, T] value 0, gradient d logp: carries the gradient of every ratio
    lr = logratio.detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)  # [B, T] exp() below stays finite
    seq = _seq_sums([m, lr * m] if seq_level else [m], seq_sum_fn)  # [B, P] global over CP ranks
    inv_len = _safe_div(torch.ones_like(seq[:, 0]), seq[:, 0])  # [B] 1 / T_i (0 for empty sequences)
    with torch.no_grad():
        tok_ratio = torch.exp(lr)  # [B, T]
        rv = (
            torch.exp(seq[:, 1] * inv_len).to(dtype)[:, None].expand(shape) if seq_level else tok_ratio
        )  # [B, T]
    adv = advantages.to(dtype)
    adv = torch.where(valid, adv, 0.0) if adv.dim() == 2 else adv[:, None]  # [B, T] or [B, 1]

    if cfg.surrogate == "clip":
        upper = valid & (adv > 0) & (rv > hi)  # [B, T]
        lower = valid & (adv < 0) & (rv < lo)  # [B, T]
    else:  # CISPO: "clipped" = the importance weight is clamped; no token is dropped
        upper, lower = valid & (rv > hi), valid & (rv < lo)
    clipped = upper | lower  # [B, T]
    sums["clip/upper_sum"] = upper.sum().to(f64)
    sums["clip/lower_sum"] = lower.sum().to(f64)

    if cfg.surrogate == "cispo":
        rho = rv.clamp(lo, hi) * torch.where(valid, logprobs.to(dtype), 0.0)  # [B, T] sg(clip(r)) * logp
        if masks is not None:  # CISPO clamps the weight but drops no token: nothing is in a band or rescued
            masks.update(clipped=clipped.clone(), band=torch.zeros_like(clipped), rescued=torch.zeros_like(clipped))
    else:
        value = torch.where(clipped, rv.clamp(lo, hi), rv)  # [B, T] v
        weight = (~clipped).to(dtype)  # [B, T] w
        _rescue(
            cfg, value, weight, rv, upper, clipped, adv, tis, inv_len, sample_ids, step, token_index, sums, masks
        )
        if cfg.dual_clip is not None:
            dual = valid & (adv < 0) & (rv > cfg.dual_clip)  # [B, T]
            value.masked_fill_(dual, cfg.dual_clip)
            weight.masked_fill_(dual, 0.0)
            sums["clip/dual_sum"] = dual.sum().to(f64)
        rho = value + (weight * rv) * live  # [B, T] value v, gradient w * r * d logp
    coef = -adv * m if tis is None else -adv * m * tis  # [B, T] no gradient
    pg = coef * rho  # [B, T]
    if ref_logprobs is not None:
        kl = _kl(
            cfg.kl_estimator, torch.where(valid, ref_logprobs.to(dtype) - logprobs.to(dtype), 0.0)
        )  # [B, T]
        sums["kl_ref_sum"] = (kl.detach() * m).sum().to(f64)
        if cfg.kl_coef > 0.0:
            pg = pg + (cfg.kl_coef * m) * kl

    local_tokens = m.sum(dim=1).to(f64)  # [B] (exact: integers below 2**24 per row)
    sums["tokens"] = local_tokens.sum()
    sums["seqs"] = (local_tokens * inv_len).sum()
    if cfg.aggregation == "token-mean":
        row_scale = torch.ones_like(inv_len) / _denominator(global_num_tokens, sums["tokens"])  # [B]
    else:
        row_scale = torch.ones_like(inv_len) / _denominator(global_num_seqs, sums["seqs"])
        if cfg.aggregation == "seq-mean-token-mean":
            row_scale = row_scale * inv_len
        elif cfg.aggregation == "seq-mean-token-sum-norm":
            assert cfg.max_length is not None
            row_scale = row_scale / cfg.max_length
    loss = (pg.sum(dim=1) * row_scale.to(dtype)).sum()

    with torch.no_grad():
        _ratio_stats(cfg, rv, tok_ratio, lr, m, sums)
        if entropy is not None:
            sums["entropy_sum"] = (entropy.detach().to(dtype) * m).sum().to(f64)
        if seq_level:
            per_row = {
                "seq/clip/upper_sum": upper.sum(dim=1),
                "seq/clip/lower_sum": lower.sum(dim=1),
                "seq/ratio/abs_dev_sum": (rv - 1.0).abs().mul(m).sum(dim=1),
            }
            for key, row_sums in per_row.items():
                sums[key] = (row_sums.to(f64) * inv_len).sum()
    return loss, sums


def _denominator(given: Tensor | float | None, local: Tensor) -> Tensor:
    den = local if given is None else torch.as_tensor(given, dtype=torch.float64, device=local.device)
    return torch.where(den > 0, den, 1.0)


def _rescue(
    cfg: PolicyLossConfig,
    value: Tensor,
    weight: Tensor,
    rv: Tensor,
    upper: Tensor,
    clipped: Tensor,
    adv: Tensor,
    tis: Tensor | None,
    inv_len: Tensor,
    sample_ids: Tensor | None,
    step: int | None,
    token_index: Tensor | None,
    sums: dict[str, Tensor],
    masks: dict[str, Tensor] | None = None,
) -> None:
    """NSR on the K clipped tokens (gathered): set their value ``v`` and gradient weight ``w`` [B, T] in
    place, and record the band / rescue / gradient-mass sums (the band statistics also without rescue)."""
    f64 = torch.float64
    rows, cols = clipped.nonzero(as_tuple=True)  # [K], [K]
    r_k = rv[rows, cols].to(f64)  # [K]
    up_k = upper[rows, cols]  # [K]
    side_k = {"both": torch.ones_like(up_k), "upper": up_k, "lower": ~up_k}[cfg.sides]  # [K]
    p_k = torch.where(side_k, rescue_probability(cfg, r_k, up_k), 0.0)  # [K]
    mass_k = adv.expand_as(rv)[rows, cols].abs().to(f64) * r_k  # [K] |A| r: the gradient clipping drops
    if tis is not None:
        mass_k = mass_k * tis[rows, cols]
    band_k = p_k > 0
    seq_w = inv_len[rows]  # [K] per-sequence weight of the seq/ statistics
    sums["band/upper_sum"] = (band_k & up_k).sum().to(f64)
    sums["band/lower_sum"] = (band_k & ~up_k).sum().to(f64)
    sums["rescue/p_sum"] = p_k.sum()
    sums["clip/grad_mass_sum"] = mass_k.sum()
    if cfg.ratio_level != "token":
        sums["seq/band_sum"] = (band_k * seq_w).sum()
    if cfg.rescue == "off":
        rescued_k = torch.zeros_like(p_k)
    elif cfg.rescue == "decay":  # w = p: gradient p times the unclipped one, value stays clip(r)
        rescued_k = p_k  # expected rescues
        weight[rows, cols] = p_k.to(weight.dtype)
    else:
        assert sample_ids is not None and step is not None
        keys = row_keys(cfg.seed, step, sample_ids)[rows.to(sample_ids.device)].to(rows.device)  # [K]
        if cfg.rescue_level == "sequence":
            u_k = uniform_from_keys(keys, SEQUENCE_INDEX)  # [K] float64 in [0, 1)
        else:
            u_k = uniform_from_keys(keys, cols if token_index is None else token_index[rows, cols])
        if cfg.profile == "noise":
            noise_k = u_k.mul_(2.0 * cfg.sigma).add_(1.0 - cfg.sigma)  # [K] u ~ U(1 - sigma, 1 + sigma)
            noisy_k = noise_k * r_k
            hit = side_k & (noisy_k >= 1.0 - cfg.eps_low) & (noisy_k <= 1.0 + cfg.eps_high)  # [K]
        else:
            noise_k, hit = torch.ones_like(u_k), u_k < p_k
        rescued_k = hit.to(f64)
        # rescued: v = r, w = 1 (or the noisy ratio: v = u r, w = u); the others keep v = clip(r), w = 0
        scale_k = rescued_k * noise_k if cfg.rescued_value == "noisy_ratio" else rescued_k  # [K]
        value[rows, cols] = torch.where(hit, scale_k * r_k, value[rows, cols].to(f64)).to(value.dtype)
        weight[rows, cols] = scale_k.to(weight.dtype)
    sums["rescue/upper_sum"] = (rescued_k * up_k).sum()
    sums["rescue/lower_sum"] = (rescued_k * ~up_k).sum()
    sums["rescue/grad_mass_sum"] = (rescued_k * mass_k).sum()
    if cfg.ratio_level != "token":
        sums["seq/rescue/upper_sum"] = (rescued_k * up_k * seq_w).sum()
        sums["seq/rescue/lower_sum"] = (rescued_k * ~up_k * seq_w).sum()
    if masks is not None:
        masks["clipped"] = clipped.clone()
        stochastic = cfg.rescue == "stochastic"
        for name, chosen in (("band", band_k), ("rescued", rescued_k > 0 if stochastic else torch.zeros_like(band_k))):
            m = torch.zeros_like(clipped)
            m[rows[chosen], cols[chosen]] = True
            masks[name] = m


def _ratio_stats(
    cfg: PolicyLossConfig, rv: Tensor, tok_ratio: Tensor, lr: Tensor, m: Tensor, sums: dict[str, Tensor]
) -> None:
    """Mean |r - 1|, approx KL(old || new) (k3: r - 1 - log r, token ratios) and the boundary histograms."""
    f64 = torch.float64
    sums["ratio/abs_dev_sum"] = (rv - 1.0).abs_().mul_(m).sum().to(f64)
    sums["kl_old_sum"] = (tok_ratio - lr).sub_(1.0).mul_(m).sum().to(f64)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    valid = m > 0  # [B, T]
    # (r - hi) / eps_high >= e  <=>  r >= hi + eps_high e;  (lo - r) / eps_low >= e  <=>  r <= lo - eps_low e.
    # The bin index is the number of edges passed (a uint8 sum of comparisons: faster than bucketize on CPU).
    for side, upper in (("upper", True), ("lower", False)):
        bins = torch.zeros(rv.shape, dtype=torch.uint8, device=rv.device)  # [B, T]
        for e in cfg.hist_edges:
            bins += rv >= hi + cfg.eps_high * e if upper else rv <= lo - cfg.eps_low * e
        bins *= valid  # masked tokens -> bin 0 (below the first edge), which is not reported
        counts = torch.bincount(bins.flatten(), minlength=len(cfg.hist_edges) + 1)  # [E + 1]
        for k, edge in enumerate(cfg.hist_edges):  # bin k + 1 covers [edges[k], edges[k + 1])
            sums[f"ratio_hist/{side}/{edge:+g}_sum"] = counts[k + 1].to(f64)
