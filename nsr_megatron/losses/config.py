"""Which policy loss, and all its knobs: :class:`PolicyLossConfig` and the named :data:`PRESETS`.

The definitions, the defaults and their sources are in docs/LOSSES.md; the maths is in
:mod:`nsr_megatron.losses.policy`. A preset is a complete value for every field; a field set explicitly overrides
it. Validation is a table of (field, valid?, reason, fix); a knob that the chosen loss ignores warns.
"""

from __future__ import annotations

import itertools
import typing
import warnings
from dataclasses import dataclass, fields
from typing import Any, Literal

__all__ = ["PRESETS", "PolicyLossConfig"]

Surrogate = Literal["clip", "cispo", "sapo", "unclipped"]
RatioLevel = Literal["token", "sequence", "sequence-token"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
Rescue = Literal["off", "stochastic", "decay"]
Profile = Literal["noise", "constant", "linear", "widening"]
Sides = Literal["both", "upper", "lower"]
RescueLevel = Literal["token", "sequence"]
RescuedValue = Literal["ratio", "noisy_ratio"]
Cov = Literal["off", "clip", "kl"]
MisMode = Literal["drop", "zero"]
KLEstimator = Literal["k1", "k3", "low-var-k3"]

_BASE: dict[str, Any] = {
    "surrogate": "clip",
    "ratio_level": "token",
    "eps_low": 0.2,
    "eps_high": 0.28,
    "dual_clip": None,
    "tau_pos": 1.0,
    "tau_neg": 1.05,
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
    "cov": "off",
    "clip_cov_ratio": 2e-4,
    "clip_cov_lb": 1.0,
    "clip_cov_ub": 5.0,
    "kl_cov_ratio": 2e-4,
    "kl_cov_coef": 1.0,
    "tis_cap": None,
    "mis_low": None,
    "mis_high": None,
    "mis_mode": "drop",
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
_GRPO: dict[str, Any] = {"eps_high": 0.2, "aggregation": "seq-mean-token-mean"}

PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {**_BASE, **_GRPO},
    "dapo": dict(_BASE),
    "gspo": {**_BASE, **_GSPO},
    "gspo-token": {**_BASE, **_GSPO, "ratio_level": "sequence-token"},
    "cispo": {**_BASE, "surrogate": "cispo", "eps_low": 1.0},
    "nsr": {**_BASE, "rescue": "stochastic"},
    "nsr-decay": {**_BASE, "rescue": "decay"},
    "nsr-widen": {**_BASE, "rescue": "stochastic", "profile": "widening"},
    "nsr-gspo": {**_BASE, **_GSPO, "rescue": "stochastic"},
    "nsr-gspo-decay": {**_BASE, **_GSPO, "rescue": "decay"},
    # SAPO (arXiv 2511.20347; verl's defaults tau_pos = 1.0, tau_neg = 1.05 and seq-mean-token-mean).
    "sapo": {**_BASE, "surrogate": "sapo", "aggregation": "seq-mean-token-mean"},
    # Clip-Cov (arXiv 2505.22617): the authors' recipe (PRIME-RL/Entropy-Mechanism-of-RL) clips with
    # eps_low = eps_high = 1 and detaches r = 2e-4 of the tokens with covariance in (1, 5).
    "clip-cov": {**_BASE, "cov": "clip", "eps_low": 1.0, "eps_high": 1.0},
    # KL-Cov: no clip; |log r| penalty with beta = 1 on the top k = 2e-4 by covariance (verl's default k, the
    # paper's 32B setting; its 7B runs used 2e-3).
    "kl-cov": {**_BASE, "surrogate": "unclipped", "cov": "kl"},
    # IcePop (Ring-1T, arXiv 2510.18855): weight M(k) = k on [0.5, 5], 0 outside, on the GRPO objective.
    "icepop": {**_BASE, **_GRPO, "mis_low": 0.5, "mis_high": 5.0, "tis_cap": 5.0, "mis_mode": "zero"},
}
"""Every loss by name: a complete value for every field of :class:`PolicyLossConfig` but ``name``."""

_PRESET: Any = None  # a field left at this default takes the value of the preset ``name``

_NSR_KNOBS = ("profile", "sigma", "delta", "p0", "sides", "rescue_level", "rescued_value", "seed")
_NO_CLIP = {  # surrogate -> why it drops no token (so NSR has nothing to rescue)
    "cispo": "CISPO never drops a token",
    "sapo": "SAPO's soft gate drops no token",
    "unclipped": "the unclipped surrogate drops no token",
}


@dataclass(kw_only=True)
class PolicyLossConfig:
    """Which policy loss and all its knobs (docs/LOSSES.md). Fields left unset take the preset ``name``'s value.

    ``PolicyLossConfig(name="nsr", sigma=0.05)`` is the ``nsr`` preset with ``sigma`` overridden; the
    presets are :data:`PRESETS`. A knob that the chosen loss ignores and that differs from the preset warns.
    ``hist_edges`` are in units of eps past each boundary: ``(r - hi) / eps_high`` above,
    ``(lo - r) / eps_low`` below; bin k counts ``[edges[k], edges[k+1])``, the last bin is open.

    Beside the clip and NSR knobs: ``tau_pos`` / ``tau_neg`` are SAPO's gate temperatures (A > 0 / A <= 0);
    ``cov`` adds Clip-Cov (``clip``: detach ``clip_cov_ratio`` of the tokens, drawn among those whose
    covariance lies in ``(clip_cov_lb, clip_cov_ub)``) or KL-Cov (``kl``: ``kl_cov_coef * |log r|`` on the top
    ``kl_cov_ratio`` by covariance); ``mis_mode`` says what MIS does with a token outside
    ``[mis_low, mis_high]``: ``drop`` it from the loss and the denominators, or ``zero`` its weight and keep it
    in the denominators (IcePop).
    """

    name: str = "nsr"
    surrogate: Surrogate = _PRESET
    ratio_level: RatioLevel = _PRESET
    eps_low: float = _PRESET
    eps_high: float = _PRESET
    dual_clip: float | None = _PRESET
    tau_pos: float = _PRESET
    tau_neg: float = _PRESET
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
    cov: Cov = _PRESET
    clip_cov_ratio: float = _PRESET
    clip_cov_lb: float = _PRESET
    clip_cov_ub: float = _PRESET
    kl_cov_ratio: float = _PRESET
    kl_cov_coef: float = _PRESET
    tis_cap: float | None = _PRESET
    mis_low: float | None = _PRESET
    mis_high: float | None = _PRESET
    mis_mode: MisMode = _PRESET
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

    def departures(self) -> dict[str, tuple[Any, Any]]:
        """The fields that differ from the preset ``name``, as ``{field: (value, preset's value)}``; ``seed`` is left
        out (runs derive it from ``run.seed``). ``compare`` prints them: a field set in the config file applies to
        every loss compared, e.g. a task's narrower eps to CISPO's cap and Clip-Cov's bounds."""
        preset = PRESETS[self.name]
        return {f.name: (getattr(self, f.name), preset[f.name]) for f in fields(self)
                if f.name not in ("name", "seed") and getattr(self, f.name) != preset[f.name]}

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
            ("tau_pos", isinstance(v.tau_pos, real) and v.tau_pos > 0.0,
             "must be > 0 (SAPO's gate temperature for A > 0)", "use e.g. 1.0"),
            ("tau_neg", isinstance(v.tau_neg, real) and v.tau_neg > 0.0,
             "must be > 0 (SAPO's gate temperature for A <= 0)", "use e.g. 1.05"),
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
            ("clip_cov_ratio", isinstance(v.clip_cov_ratio, real) and 0.0 < v.clip_cov_ratio <= 1.0,
             "must be in (0, 1] (the fraction of tokens Clip-Cov detaches)", "use e.g. 2e-4"),
            ("clip_cov_lb", isinstance(v.clip_cov_lb, real) and isinstance(v.clip_cov_ub, real)
             and v.clip_cov_lb < v.clip_cov_ub,
             f"must be below clip_cov_ub={v.clip_cov_ub!r} (the covariance band is (lb, ub))",
             "use e.g. clip_cov_lb=1.0, clip_cov_ub=5.0"),
            ("kl_cov_ratio", isinstance(v.kl_cov_ratio, real) and 0.0 < v.kl_cov_ratio <= 1.0,
             "must be in (0, 1] (the fraction of tokens KL-Cov penalises)", "use e.g. 2e-4 or 2e-3"),
            ("kl_cov_coef", isinstance(v.kl_cov_coef, real) and v.kl_cov_coef >= 0.0,
             "must be >= 0", "use e.g. 1.0"),
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
             f"needs surrogate='clip' ({_NO_CLIP.get(v.surrogate, '')})", "use rescue='off'"),
            ("rescue", v.rescue == "off" or v.cov == "off",
             f"cannot be combined with cov={v.cov!r} (both change the gradient of chosen tokens)",
             "use rescue='off' or cov='off'"),
            ("cov", v.cov == "off" or v.surrogate in ("clip", "unclipped"),
             f"needs surrogate='clip' or 'unclipped' (Clip-Cov and KL-Cov act on the ratio surrogate -A*r; "
             f"surrogate={v.surrogate!r} is another loss)", "use cov='off' or one of those surrogates"),
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
        if self.cov == "clip":
            ignored.pop("seed", None)  # Clip-Cov's random selection is drawn from the seed
        if self.surrogate == "cispo":
            ignored["dual_clip"] = "surrogate='cispo' never clips the loss"
        if self.surrogate in ("sapo", "unclipped"):
            why = f"surrogate={self.surrogate!r} has no hard clip; eps only places the ratio histogram"
            ignored.update(dict.fromkeys(("eps_low", "eps_high"), why))
        if self.surrogate != "sapo":
            ignored.update(dict.fromkeys(("tau_pos", "tau_neg"), f"surrogate={self.surrogate!r}"))
        if self.cov != "clip":
            ignored.update(dict.fromkeys(("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"), f"cov={self.cov!r}"))
        if self.cov != "kl":
            ignored.update(dict.fromkeys(("kl_cov_ratio", "kl_cov_coef"), f"cov={self.cov!r}"))
        if self.mis_low is None and self.mis_high is None:
            ignored["mis_mode"] = "no MIS bound is set (mis_low = mis_high = None)"
        if self.aggregation != "seq-mean-token-sum-norm":
            ignored["max_length"] = f"aggregation={self.aggregation!r}"
        return ignored
