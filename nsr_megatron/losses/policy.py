"""Policy-gradient losses for RLVR: PPO/GRPO clip, DAPO, GSPO(-token), CISPO, SAPO, Clip-Cov, KL-Cov, IcePop and
NSR (definitions, defaults and sources: docs/LOSSES.md; configuration: :mod:`.config`).

Notation (per response token): ``r = exp(logp - old)`` (difference in fp32, clamped to ``+-LOG_RATIO_LIMIT``
= 20 before the ``exp``), ``A`` the advantage, ``m`` the
response mask, ``lo = 1 - eps_low``, ``hi = 1 + eps_high``, ``sg`` = stop-gradient. Every ratio
surrogate is written as ``L = -A * rho`` with an *effective ratio*
``rho = v + w * sg(r) * (logp - sg(logp))``: its value is ``v`` and its gradient ``w * r * grad(logp)``;
the variants (one function each, :data:`_SURROGATES`) only choose ``v`` and ``w``:

- clip (PPO / GRPO / DAPO): the clipped set is ``C = {A > 0, r > hi} u {A < 0, r < lo}``; on ``C``
  ``v = clip(r, lo, hi), w = 0`` (the value of ``max(-A r, -A clip(r))`` and no gradient), elsewhere
  ``v = r, w = 1``. Dual clip (c > 1): for ``A < 0`` and ``r > c``, ``v = c, w = 0`` (``L = min(L, -c A)``).
- unclipped: ``v = r, w = 1`` everywhere (the importance-sampled policy gradient; KL-Cov's surrogate).
- GSPO (arXiv 2507.18071): ``s_i = exp(mean_t (logp - old))`` replaces ``r`` for every token of response
  ``i`` (GSPO-token form: value ``s_i``, gradient ``s_i * grad(logp_t)``). With a per-sequence advantage
  and the aggregations below (uniform weight within a sequence) this is *exactly* GSPO's gradient, and the
  sequence mean is needed only as a value, so under context parallelism ``seq_sum_fn`` is a plain all-reduce.
- CISPO (arXiv 2506.13585): ``L = -sg(clip(r, lo, hi)) * A * logp`` (no token is dropped).
- SAPO (arXiv 2511.20347): a soft gate ``f(r) = (4 / tau) sigmoid(tau (r - 1))`` in place of the clip, ``tau =
  tau_pos`` for ``A > 0`` and ``tau_neg`` otherwise: ``v = f(r)``, ``w = f'(r) = 4 s (1 - s)`` with ``s =
  sigmoid(tau (r - 1))`` (1 at ``r = 1``, decaying smoothly on both sides; no token is dropped).
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

Covariance methods (Cui et al., arXiv 2505.22617), on the clip or unclipped surrogate: per valid token
``cov = (A - mean A) (sg(logp) - mean sg(logp))``, means over the valid tokens of *this call*. Clip-Cov
(``cov="clip"``): among the tokens outside ``C`` with ``clip_cov_lb < cov < clip_cov_ub``, ``n =
min(max(int(clip_cov_ratio N), 1), #band)`` are drawn uniformly without replacement (the n smallest
counter-based draws of (seed, step, sample id, token index)); those get ``rho = 0`` (no value, no gradient).
KL-Cov (``cov="kl"``): the ``max(int(kl_cov_ratio N), 1)`` tokens of largest ``cov`` get ``+ kl_cov_coef *
|logp - old|``. As in the reference implementation, which runs per micro-batch, ``N``, the means and the selection
belong to the call: unlike every other variant, these two depend on how the batch is split.

Then ``L_tok = -A * rho`` (plus the KL-Cov penalty), times the TIS weight ``min(exp(old - rollout), tis_cap)``,
plus ``kl_coef * KL(ref)``. MIS with ``mis_mode="drop"`` removes tokens with ``k = exp(old - rollout)`` outside
``[mis_low, mis_high]`` from the mask *and* from the denominators; with ``mis_mode="zero"`` their weight is 0 and
they stay in the denominators: with ``tis_cap >= mis_high`` that is IcePop's ``M(k) = k`` on the band, 0 outside.
Aggregations (``N`` tokens, ``S`` sequences of the *global* batch,
``T_i`` response length of sequence ``i`` over all context-parallel ranks, ``L`` = ``max_length``):
``token-mean``: ``sum(m L) / N``; ``seq-mean-token-mean``: ``sum_i (sum_t m L) / T_i / S``;
``seq-mean-token-sum``: ``sum(m L) / S``; ``seq-mean-token-sum-norm`` (Dr.GRPO): ``sum(m L) / (L S)``.

The returned ``loss`` is this call's additive share: summed over micro-batches and over data- and
context-parallel ranks it is the global loss, so gradients must be *summed* across those ranks (not
averaged) when ``global_num_tokens`` / ``global_num_seqs`` come from :func:`loss_denominators` reduced with
:func:`nsr_megatron.losses.reduce.global_sums`.

Shape legend: B rows (sequences) of this micro-batch on this rank; T token columns on this rank (a
context-parallel rank holds a slice of every sequence); K gathered tokens (clipped tokens for rescue, band or
valid tokens for the covariance methods); E histogram edges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from nsr_megatron.losses.config import PRESETS, KLEstimator, PolicyLossConfig
from nsr_megatron.losses.rng import SEQUENCE_INDEX, row_keys, uniform_from_keys

__all__ = [
    "LOG_RATIO_LIMIT",
    "PRESETS",
    "PolicyLossConfig",
    "RescueResult",
    "SurrogateTerms",
    "loss_denominators",
    "policy_loss",
    "rescue_probability",
]

SeqSumFn = Callable[[Tensor], Tensor]

LOG_RATIO_LIMIT = 20.0
"""Log-ratios (``logp - old``, and ``old - rollout`` for TIS / MIS) are clamped to ``[-20, 20]`` before ``exp``:
ratios stay within ``[2.1e-9, 4.9e8]`` and finite in fp32. Clip and rescue decisions are unchanged (they happen
near 1); only a token whose log-ratio lies past the limit sees its ratio value capped (its gradient, if any,
is ``r * d logp`` with the capped ``r``)."""

F64 = torch.float64


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
    """(mask after MIS [B, T] float, importance weight [B, T] (TIS, MIS zeros) or None, MIS/TIS metric sums)."""
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
    weight = torch.exp(log_w.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))  # [B, T] k = pi_train / pi_infer
    keep: Tensor | None = None  # [B, T] bool, MIS zero mode only
    if mis:
        inside = torch.ones_like(valid)
        if cfg.mis_low is not None:
            inside &= weight >= cfg.mis_low
        if cfg.mis_high is not None:
            inside &= weight <= cfg.mis_high
        if cfg.mis_mode == "drop":  # the token leaves the loss and its denominators
            stats["mis/masked_sum"] = (m * ~inside).sum().to(F64)
            m = m * inside
        else:  # zero: weight 0, the token stays in the denominators (IcePop's M(k) = 0 off the band)
            stats["mis/zeroed_sum"] = (m * ~inside).sum().to(F64)
            keep = inside
    if cfg.tis_cap is None:
        return m, (None if keep is None else keep.to(dtype)), stats
    stats["tis/capped_sum"] = (m * (weight > cfg.tis_cap)).sum().to(F64)
    tis = weight.clamp(max=cfg.tis_cap)
    if keep is not None:
        tis = tis * keep
    stats["tis/weight_sum"] = (m * tis).sum().to(F64)
    return m, tis, stats


def _seq_sums(parts: list[Tensor], seq_sum_fn: SeqSumFn | None) -> Tensor:
    """Per-sequence sums [B, P] of this rank's parts, summed over context-parallel ranks by ``seq_sum_fn``."""
    sums = torch.stack([p.detach().sum(dim=1).to(F64) for p in parts], dim=1)  # [B, P]
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
    local = m.sum(dim=1).to(F64)  # [B] (exact: integers below 2**24 per row)
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
# One call's tokens, and the coordinates of its random draws


@dataclass(frozen=True)
class _Tokens:
    """One call's per-token inputs in the loss dtype (float32 or wider); no gradient unless stated."""

    m: Tensor  # [B, T] mask after MIS (float)
    valid: Tensor  # [B, T] bool: m > 0
    is_weight: Tensor | None  # [B, T] TIS / IcePop weight, None = 1
    logp: Tensor  # [B, T] log-probs, 0 where masked (gradient flows)
    logratio: Tensor  # [B, T] logp - old, 0 where masked (gradient flows)
    live: Tensor  # [B, T] value 0, gradient d logp: carries the gradient of every ratio
    lr: Tensor  # [B, T] log-ratio clamped to +-LOG_RATIO_LIMIT
    ratio: Tensor  # [B, T] token ratio r = exp(lr)
    rv: Tensor  # [B, T] the surrogate's ratio: r, or s_i broadcast over response i (sequence levels)
    adv: Tensor  # [B, T] (per token, 0 where masked) or [B, 1]
    inv_len: Tensor  # [B] float64 1 / T_i (0 for empty sequences)


class Draw(NamedTuple):
    """Coordinates of the counter-based draws (:mod:`.rng`) beside ``cfg.seed``."""

    sample_ids: Tensor | None  # [B] int64 unique id of each sample in the run
    step: int | None  # the RL step
    token_index: Tensor | None  # [B, T] int64 position in the response; None: the column index

    def uniforms(self, seed: int, rows: Tensor, cols: Tensor, *, sequence: bool = False) -> Tensor:
        """float64 U[0, 1) draws [K] of the tokens at (``rows``, ``cols``) [K], or of their sequences."""
        assert self.sample_ids is not None and self.step is not None
        keys = row_keys(seed, self.step, self.sample_ids)[rows.to(self.sample_ids.device)].to(rows.device)  # [K]
        if sequence:
            return uniform_from_keys(keys, SEQUENCE_INDEX)
        return uniform_from_keys(keys, cols if self.token_index is None else self.token_index[rows, cols])


def _tokens(
    cfg: PolicyLossConfig,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    rollout_logprobs: Tensor | None,
    seq_sum_fn: SeqSumFn | None,
) -> tuple[_Tokens, dict[str, Tensor]]:
    """The masked per-token inputs of one call (see :class:`_Tokens`), and the MIS / TIS sums."""
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m, is_weight, sums = _effective_mask(cfg, mask, old_logprobs, rollout_logprobs, dtype)  # [B, T]
    valid = m > 0  # [B, T]
    seq_level = cfg.ratio_level != "token"
    logratio = torch.where(valid, logprobs.to(dtype) - old_logprobs.to(dtype), 0.0)  # [B, T]
    lr = logratio.detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)  # [B, T] exp() below stays finite
    seq = _seq_sums([m, lr * m] if seq_level else [m], seq_sum_fn)  # [B, P] global over CP ranks
    inv_len = _safe_div(torch.ones_like(seq[:, 0]), seq[:, 0])  # [B]
    with torch.no_grad():
        ratio = torch.exp(lr)  # [B, T]
        rv = torch.exp(seq[:, 1] * inv_len).to(dtype)[:, None].expand(logprobs.shape) if seq_level else ratio
    adv = advantages.to(dtype)
    adv = torch.where(valid, adv, 0.0) if adv.dim() == 2 else adv[:, None]  # [B, T] or [B, 1]
    tok = _Tokens(
        m=m,
        valid=valid,
        is_weight=is_weight,
        logp=torch.where(valid, logprobs.to(dtype), 0.0),
        logratio=logratio,
        live=logratio - logratio.detach(),
        lr=lr,
        ratio=ratio,
        rv=rv,
        adv=adv,
        inv_len=inv_len,
    )
    return tok, sums


# ---------------------------------------------------------------------------------------------------------
# The surrogates: one function each, (cfg, tokens, draw) -> SurrogateTerms


class SurrogateTerms(NamedTuple):
    """What a surrogate computes for one call: ``L_tok = -A * rho`` and what it clipped."""

    rho: Tensor  # [B, T] the effective ratio (value v, gradient w r d logp; CISPO: sg(clip(r)) logp)
    upper: Tensor  # [B, T] bool: clipped above (A > 0, r > hi; CISPO: weight capped at hi)
    lower: Tensor  # [B, T] bool: clipped below (A < 0, r < lo; CISPO: weight raised to lo)
    sums: dict[str, Tensor]  # float64 scalar sums for the statistics
    masks: dict[str, Tensor]  # [B, T] bool: clipped, band (p > 0), rescued


def _rho(value: Tensor, weight: Tensor, tok: _Tokens) -> Tensor:
    """``rho = v + w * sg(r) * (logp - sg(logp))`` [B, T]: value ``v``, gradient ``w r d logp``."""
    return value + (weight * tok.rv) * tok.live


def _dual_clip(
    cfg: PolicyLossConfig, tok: _Tokens, value: Tensor, weight: Tensor, over: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Dual clip: for ``A < 0`` where ``over`` [B, T] (the ratio, or SAPO's gate) exceeds ``c``: ``v = c, w = 0``."""
    if cfg.dual_clip is None:
        return value, weight, {}
    dual = tok.valid & (tok.adv < 0) & (over > cfg.dual_clip)  # [B, T]
    return value.masked_fill(dual, cfg.dual_clip), weight.masked_fill(dual, 0.0), {"clip/dual_sum": dual.sum().to(F64)}


def _no_masks(tok: _Tokens) -> dict[str, Tensor]:
    none = torch.zeros_like(tok.valid)
    return {"clipped": none, "band": none.clone(), "rescued": none.clone()}


def _clip_terms(cfg: PolicyLossConfig, tok: _Tokens, draw: Draw) -> SurrogateTerms:
    """PPO clip ``max(-A r, -A clip(r, lo, hi))`` with NSR's rescue of the clipped tokens and the dual clip."""
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    upper = tok.valid & (tok.adv > 0) & (tok.rv > hi)  # [B, T]
    lower = tok.valid & (tok.adv < 0) & (tok.rv < lo)  # [B, T]
    clipped = upper | lower  # [B, T]
    res = _rescue(cfg, tok, upper, clipped, draw)
    at = (res.rows, res.cols)
    value = torch.where(clipped, tok.rv.clamp(lo, hi), tok.rv).index_put(at, res.value.to(tok.rv.dtype))  # v
    weight = (~clipped).to(tok.rv.dtype).index_put(at, res.weight.to(tok.rv.dtype))  # [B, T] w
    value, weight, dual_sums = _dual_clip(cfg, tok, value, weight, tok.rv)
    chosen = {"band": res.band, "rescued": res.rescued > 0 if cfg.rescue == "stochastic" else None}
    masks = {"clipped": clipped.clone()}
    for name, pick in chosen.items():
        masks[name] = torch.zeros_like(clipped)
        if pick is not None:
            masks[name][res.rows[pick], res.cols[pick]] = True
    return SurrogateTerms(_rho(value, weight, tok), upper, lower, {**res.sums, **dual_sums}, masks)


def _unclipped_terms(cfg: PolicyLossConfig, tok: _Tokens, draw: Draw) -> SurrogateTerms:
    """``-A r`` on every token (``v = r, w = 1``), with the dual clip if set."""
    value, weight, sums = _dual_clip(cfg, tok, tok.rv, torch.ones_like(tok.rv), tok.rv)
    none = torch.zeros_like(tok.valid)
    return SurrogateTerms(_rho(value, weight, tok), none, none, sums, _no_masks(tok))


def _cispo_terms(cfg: PolicyLossConfig, tok: _Tokens, draw: Draw) -> SurrogateTerms:
    """CISPO ``-sg(clip(r, lo, hi)) A logp``: "clipped" means the weight is clamped; no token is dropped."""
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    upper, lower = tok.valid & (tok.rv > hi), tok.valid & (tok.rv < lo)  # [B, T]
    masks = {**_no_masks(tok), "clipped": upper | lower}
    return SurrogateTerms(tok.rv.clamp(lo, hi) * tok.logp, upper, lower, {}, masks)


def _sapo_terms(cfg: PolicyLossConfig, tok: _Tokens, draw: Draw) -> SurrogateTerms:
    """SAPO's soft gate ``f(r) = (4 / tau) sigmoid(tau (r - 1))``: ``v = f(r)``, ``w = 4 s (1 - s)``."""
    tau = torch.full_like(tok.adv, cfg.tau_neg).masked_fill(tok.adv > 0, cfg.tau_pos)  # [B, T] or [B, 1]
    s = torch.sigmoid(tau * (tok.rv - 1.0))  # [B, T]
    gate = s * (4.0 / tau)  # [B, T] f(r); f'(r) = 4 s (1 - s)
    value, weight, sums = _dual_clip(cfg, tok, gate, 4.0 * s * (1.0 - s), gate)
    sums["sapo/grad_weight_sum"] = (weight * tok.m).sum().to(F64)
    none = torch.zeros_like(tok.valid)
    return SurrogateTerms(_rho(value, weight, tok), none, none, sums, _no_masks(tok))


_SURROGATES: dict[str, Callable[[PolicyLossConfig, _Tokens, Draw], SurrogateTerms]] = {
    "clip": _clip_terms,
    "unclipped": _unclipped_terms,
    "cispo": _cispo_terms,
    "sapo": _sapo_terms,
}


# ---------------------------------------------------------------------------------------------------------
# NSR


class RescueResult(NamedTuple):
    """NSR's outcome on the K clipped tokens, gathered at (``rows``, ``cols``)."""

    rows: Tensor  # [K] int64
    cols: Tensor  # [K] int64
    value: Tensor  # [K] float64 v: clip(r), or r (u r with the noisy ratio) where rescued
    weight: Tensor  # [K] float64 w: 0, or 1 (u) where rescued; p with rescue='decay'
    band: Tensor  # [K] bool: p > 0
    rescued: Tensor  # [K] float64: 1 where the draw rescued; p with rescue='decay'; 0 with rescue='off'
    sums: dict[str, Tensor]  # band / rescue / gradient-mass sums (the band statistics also without rescue)


def _rescue(cfg: PolicyLossConfig, tok: _Tokens, upper: Tensor, clipped: Tensor, draw: Draw) -> RescueResult:
    """NSR on the clipped tokens (``clipped`` [B, T], of which ``upper`` [B, T] above the boundary)."""
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    rows, cols = clipped.nonzero(as_tuple=True)  # [K], [K]
    r_k = tok.rv[rows, cols].to(F64)  # [K]
    up_k = upper[rows, cols]  # [K]
    side_k = {"both": torch.ones_like(up_k), "upper": up_k, "lower": ~up_k}[cfg.sides]  # [K]
    p_k = torch.where(side_k, rescue_probability(cfg, r_k, up_k), 0.0)  # [K]
    mass_k = tok.adv.expand_as(tok.rv)[rows, cols].abs().to(F64) * r_k  # [K] |A| r: the gradient clipping drops
    if tok.is_weight is not None:
        mass_k = mass_k * tok.is_weight[rows, cols]
    band_k = p_k > 0
    value_k = r_k.clamp(lo, hi)  # [K] the clip value, kept unless rescued
    if cfg.rescue == "off":
        rescued_k = weight_k = torch.zeros_like(p_k)
    elif cfg.rescue == "decay":  # w = p: gradient p times the unclipped one, value stays clip(r)
        rescued_k = weight_k = p_k  # expected rescues
    else:
        sequence = cfg.rescue_level == "sequence"
        u_k = draw.uniforms(cfg.seed, rows, cols, sequence=sequence)  # [K] float64 in [0, 1)
        if cfg.profile == "noise":
            noise_k = u_k * (2.0 * cfg.sigma) + (1.0 - cfg.sigma)  # [K] u ~ U(1 - sigma, 1 + sigma)
            noisy_k = noise_k * r_k
            hit = side_k & (noisy_k >= lo) & (noisy_k <= hi)  # [K]
        else:
            noise_k, hit = torch.ones_like(u_k), u_k < p_k
        rescued_k = hit.to(F64)
        # rescued: v = r, w = 1 (or the noisy ratio: v = u r, w = u); the others keep v = clip(r), w = 0
        weight_k = rescued_k * noise_k if cfg.rescued_value == "noisy_ratio" else rescued_k  # [K]
        value_k = torch.where(hit, weight_k * r_k, value_k)
    seq_w = tok.inv_len[rows]  # [K] per-sequence weight of the seq/ statistics
    sums = {
        "band/upper_sum": (band_k & up_k).sum().to(F64),
        "band/lower_sum": (band_k & ~up_k).sum().to(F64),
        "rescue/p_sum": p_k.sum(),
        "clip/grad_mass_sum": mass_k.sum(),
        "rescue/upper_sum": (rescued_k * up_k).sum(),
        "rescue/lower_sum": (rescued_k * ~up_k).sum(),
        "rescue/grad_mass_sum": (rescued_k * mass_k).sum(),
    }
    if cfg.ratio_level != "token":
        sums["seq/band_sum"] = (band_k * seq_w).sum()
        sums["seq/rescue/upper_sum"] = (rescued_k * up_k * seq_w).sum()
        sums["seq/rescue/lower_sum"] = (rescued_k * ~up_k * seq_w).sum()
    return RescueResult(rows, cols, value_k, weight_k, band_k, rescued_k, sums)


# ---------------------------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov


def _covariance(tok: _Tokens) -> Tensor:
    """``(A - mean A) (sg(logp) - mean sg(logp))`` [B, T] float64, means over the valid tokens; 0 where masked."""
    n = tok.valid.sum().clamp(min=1).to(F64)
    adv = torch.where(tok.valid, tok.adv.expand_as(tok.logp), 0.0).to(F64)  # [B, T]
    logp = tok.logp.detach().to(F64)  # [B, T] 0 where masked
    centred = (adv - adv.sum() / n) * (logp - logp.sum() / n)  # [B, T]
    return torch.where(tok.valid, centred, 0.0)


def _cov_select(cfg: PolicyLossConfig, tok: _Tokens, clipped: Tensor, draw: Draw) -> tuple[Tensor, dict[str, Tensor]]:
    """The tokens Clip-Cov detaches or KL-Cov penalises ([B, T] bool), and their counts."""
    cov = _covariance(tok)  # [B, T]
    n_tokens = int(tok.valid.sum())
    selected = torch.zeros_like(tok.valid)
    if cfg.cov == "clip":
        band = tok.valid & ~clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)  # [B, T]
        rows, cols = band.nonzero(as_tuple=True)  # [K]
        n = min(max(int(cfg.clip_cov_ratio * n_tokens), 1), rows.numel())
        # n smallest draws = a uniformly random n-subset of the band, reproducible from (seed, step, id, index)
        pick = torch.sort(draw.uniforms(cfg.seed, rows, cols), stable=True).indices[:n]  # [n]
        selected[rows[pick], cols[pick]] = True
        return selected, {"cov/band_sum": band.sum().to(F64), "cov/selected_sum": selected.sum().to(F64)}
    rows, cols = tok.valid.nonzero(as_tuple=True)  # [K] every valid token
    n = min(max(int(n_tokens * cfg.kl_cov_ratio), 1), rows.numel())
    pick = torch.sort(cov[rows, cols], descending=True, stable=True).indices[:n]  # [n] ties: first in row order
    selected[rows[pick], cols[pick]] = True
    return selected, {"cov/selected_sum": selected.sum().to(F64)}


# ---------------------------------------------------------------------------------------------------------
# The loss


def _check_inputs(
    cfg: PolicyLossConfig,
    logprobs: Tensor,
    advantages: Tensor,
    sample_ids: Tensor | None,
    step: int | None,
    ref_logprobs: Tensor | None,
    same_shape: dict[str, Tensor | None],
) -> None:
    """ValueErrors naming the argument, its shape and the fix."""
    shape = logprobs.shape
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs has shape {tuple(shape)}; expected [B, T] (rows = sequences).")
    for name, x in same_shape.items():
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(shape)} like logprobs [B, T].")
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
    draws = {"rescue='stochastic'": cfg.rescue == "stochastic", "cov='clip' (Clip-Cov)": cfg.cov == "clip"}
    for draws_by, on in draws.items():
        if on and (sample_ids is None or step is None):
            raise ValueError(
                f"{draws_by} needs sample_ids [B] (int64) and step: each draw is a hash of "
                "(seed, step, sample id, token index), so pass both."
            )
    if sample_ids is not None and sample_ids.shape != shape[:1]:
        raise ValueError(f"sample_ids has shape {tuple(sample_ids.shape)}; expected [B]={tuple(shape[:1])}.")
    if cfg.kl_coef > 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logprobs [B, T]; pass them or set kl_coef=0.")


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
            by ``rescue='stochastic'`` and ``cov='clip'`` (a draw hashes seed, step, sample id and token index).
        token_index: [B, T] int64 position of each token in its response (default: the column index);
            pass it when a sequence is split across context-parallel ranks.
        global_num_tokens / global_num_seqs: the global denominators (:func:`loss_denominators`, reduced);
            default: this micro-batch's own (correct for a single process and micro-batch).
        seq_sum_fn: sums a per-sequence [B, P] float64 tensor over the context-parallel ranks sharing the
            sequences (forward only); None when every rank holds whole sequences.
        ref_logprobs: [B, T] reference log-probs for the KL penalty / metric. ``rollout_logprobs``: [B, T]
            the rollout engine's log-probs for TIS / MIS. ``entropy``: [B, T] per-token entropy (metric).
        masks: a dict to fill with per-token bool masks [B, T]: ``clipped`` (hard clipping would drop the token),
            ``band`` (clipped, within the rescue band: p > 0), ``rescued`` (rescued by the stochastic draw) and,
            with ``cov`` on, ``cov`` (detached by Clip-Cov / penalised by KL-Cov).

    Returns:
        ``(loss, sums)``: the scalar loss share and a dict of float64 scalar sums/counts to all-reduce
        (:func:`nsr_megatron.losses.reduce.global_sums`) and turn into statistics with
        :func:`nsr_megatron.losses.reduce.summarize_metrics`.
    """
    same_shape = {"old_logprobs": old_logprobs, "mask": mask, "token_index": token_index, "entropy": entropy,
                  "ref_logprobs": ref_logprobs, "rollout_logprobs": rollout_logprobs}  # fmt: skip
    _check_inputs(cfg, logprobs, advantages, sample_ids, step, ref_logprobs, same_shape)
    tok, sums = _tokens(cfg, logprobs, old_logprobs, advantages, mask, rollout_logprobs, seq_sum_fn)
    draw = Draw(sample_ids, step, token_index)
    terms = _SURROGATES[cfg.surrogate](cfg, tok, draw)
    sums["clip/upper_sum"] = terms.upper.sum().to(F64)
    sums["clip/lower_sum"] = terms.lower.sum().to(F64)
    sums.update(terms.sums)
    rho, cov_masks = terms.rho, {}
    if cfg.cov != "off":
        selected, cov_sums = _cov_select(cfg, tok, terms.upper | terms.lower, draw)  # [B, T]
        sums.update(cov_sums)
        cov_masks["cov"] = selected
        if cfg.cov == "clip":  # Clip-Cov: the chosen tokens leave the loss (value and gradient 0)
            rho = torch.where(selected, 0.0, rho)
    if masks is not None:
        masks.update(terms.masks, **cov_masks)

    m, w = tok.m, tok.is_weight
    coef = -tok.adv * m if w is None else -tok.adv * m * w  # [B, T] no gradient
    pg = coef * rho  # [B, T]
    if cfg.cov == "kl":  # KL-Cov: + beta |logp - old| on the chosen tokens (weighted like the surrogate)
        chosen = cov_masks["cov"].to(m.dtype) * (m if w is None else m * w)  # [B, T]
        pg = pg + (cfg.kl_cov_coef * chosen) * tok.logratio.abs()
    if ref_logprobs is not None:
        kl = _kl(cfg.kl_estimator, torch.where(tok.valid, ref_logprobs.to(tok.logp.dtype) - tok.logp, 0.0))
        sums["kl_ref_sum"] = (kl.detach() * m).sum().to(F64)
        if cfg.kl_coef > 0.0:
            pg = pg + (cfg.kl_coef * m) * kl
    loss = (pg.sum(dim=1) * _row_scale(cfg, tok, sums, global_num_tokens, global_num_seqs).to(pg.dtype)).sum()

    with torch.no_grad():
        _ratio_stats(cfg, tok, sums)
        if entropy is not None:
            sums["entropy_sum"] = (entropy.detach().to(m.dtype) * m).sum().to(F64)
        if cfg.ratio_level != "token":
            per_row = {
                "seq/clip/upper_sum": terms.upper.sum(dim=1),
                "seq/clip/lower_sum": terms.lower.sum(dim=1),
                "seq/ratio/abs_dev_sum": (tok.rv - 1.0).abs().mul(m).sum(dim=1),
            }
            for key, row_sums in per_row.items():
                sums[key] = (row_sums.to(F64) * tok.inv_len).sum()
    return loss, sums


def _row_scale(
    cfg: PolicyLossConfig,
    tok: _Tokens,
    sums: dict[str, Tensor],
    global_num_tokens: Tensor | float | None,
    global_num_seqs: Tensor | float | None,
) -> Tensor:
    """Each row's factor [B] float64 in the aggregation; records this call's ``tokens`` / ``seqs`` in ``sums``."""
    local_tokens = tok.m.sum(dim=1).to(F64)  # [B] (exact: integers below 2**24 per row)
    sums["tokens"] = local_tokens.sum()
    sums["seqs"] = (local_tokens * tok.inv_len).sum()
    if cfg.aggregation == "token-mean":
        return torch.ones_like(tok.inv_len) / _denominator(global_num_tokens, sums["tokens"])
    row_scale = torch.ones_like(tok.inv_len) / _denominator(global_num_seqs, sums["seqs"])
    if cfg.aggregation == "seq-mean-token-mean":
        return row_scale * tok.inv_len
    if cfg.aggregation == "seq-mean-token-sum-norm":
        assert cfg.max_length is not None
        return row_scale / cfg.max_length
    return row_scale


def _denominator(given: Tensor | float | None, local: Tensor) -> Tensor:
    den = local if given is None else torch.as_tensor(given, dtype=F64, device=local.device)
    return torch.where(den > 0, den, 1.0)


def _ratio_stats(cfg: PolicyLossConfig, tok: _Tokens, sums: dict[str, Tensor]) -> None:
    """Mean |r - 1|, approx KL(old || new) (k3: r - 1 - log r, token ratios) and the boundary histograms."""
    rv, m = tok.rv, tok.m
    sums["ratio/abs_dev_sum"] = (rv - 1.0).abs_().mul_(m).sum().to(F64)
    sums["kl_old_sum"] = (tok.ratio - tok.lr).sub_(1.0).mul_(m).sum().to(F64)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    # (r - hi) / eps_high >= e  <=>  r >= hi + eps_high e;  (lo - r) / eps_low >= e  <=>  r <= lo - eps_low e.
    # The bin index is the number of edges passed (a uint8 sum of comparisons: faster than bucketize on CPU).
    for side, upper in (("upper", True), ("lower", False)):
        bins = torch.zeros(rv.shape, dtype=torch.uint8, device=rv.device)  # [B, T]
        for e in cfg.hist_edges:
            bins += rv >= hi + cfg.eps_high * e if upper else rv <= lo - cfg.eps_low * e
        bins *= tok.valid  # masked tokens -> bin 0 (below the first edge), which is not reported
        counts = torch.bincount(bins.flatten(), minlength=len(cfg.hist_edges) + 1)  # [E + 1]
        for k, edge in enumerate(cfg.hist_edges):  # bin k + 1 covers [edges[k], edges[k + 1])
            sums[f"ratio_hist/{side}/{edge:+g}_sum"] = counts[k + 1].to(F64)
