"""PolicyLossConfig: presets, overrides, validation messages, ignored-setting warnings, round trip."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest

from nsr_megatron.losses import PRESETS, PolicyLossConfig


def test_every_preset_builds_and_fills_every_field() -> None:
    for name in PRESETS:
        cfg = PolicyLossConfig(name=name)
        assert all(
            getattr(cfg, f.name) is not None
            for f in dataclasses.fields(cfg)
            if f.name in ("eps_low", "rescue")
        )
        assert set(PRESETS[name]) == {f.name for f in dataclasses.fields(cfg)} - {"name"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("grpo", {"eps_low": 0.2, "eps_high": 0.2, "aggregation": "seq-mean-token-mean", "rescue": "off"}),
        ("dapo", {"eps_low": 0.2, "eps_high": 0.28, "aggregation": "token-mean", "rescue": "off"}),
        (
            "gspo",
            {
                "eps_low": 3e-4,
                "eps_high": 4e-4,
                "aggregation": "seq-mean-token-mean",
                "ratio_level": "sequence",
            },
        ),
        ("gspo-token", {"eps_low": 3e-4, "eps_high": 4e-4, "ratio_level": "sequence-token"}),
        ("cispo", {"surrogate": "cispo", "rescue": "off"}),
        (
            "nsr",
            {
                "eps_low": 0.2,
                "eps_high": 0.28,
                "rescue": "stochastic",
                "profile": "noise",
                "rescue_level": "token",
            },
        ),
        ("nsr-decay", {"eps_high": 0.28, "rescue": "decay", "profile": "noise"}),
        ("nsr-widen", {"rescue": "stochastic", "profile": "widening"}),
        ("nsr-gspo", {"ratio_level": "sequence", "rescue": "stochastic", "rescue_level": "sequence"}),
        ("nsr-gspo-decay", {"ratio_level": "sequence", "rescue": "decay"}),
    ],
)
def test_documented_preset_defaults(name: str, expected: dict[str, object]) -> None:
    cfg = PolicyLossConfig(name=name)
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


def test_fields_override_the_preset_and_the_rest_stays() -> None:
    cfg = PolicyLossConfig(name="nsr", sigma=0.05, sides="upper", seed=7)
    assert (cfg.sigma, cfg.sides, cfg.seed) == (0.05, "upper", 7)
    assert (cfg.eps_low, cfg.eps_high, cfg.rescue) == (0.2, 0.28, "stochastic")
    # an override equal to another preset's value is kept (no "default means unset" confusion)
    assert PolicyLossConfig(name="grpo", eps_high=0.28).eps_high == 0.28


def test_resolved_config_round_trips_without_warnings() -> None:
    for name in PRESETS:
        cfg = PolicyLossConfig(name=name, dual_clip=3.0 if name != "cispo" else None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = PolicyLossConfig(**dataclasses.asdict(cfg))
        assert again == cfg


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        PolicyLossConfig(name="ppo2")
    assert str(err.value) == (
        "PolicyLossConfig.name='ppo2' is not a known loss; valid names: cispo, clip-cov, dapo, grpo, gspo, "
        "gspo-token, icepop, kl-cov, nsr, nsr-decay, nsr-gspo, nsr-gspo-decay, nsr-widen, sapo."
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"eps_low": 1.5},
            "PolicyLossConfig.eps_low=1.5 must be in (0, 1] (the lower bound is 1 - eps_low >= 0)"
            "; use e.g. 0.2.",
        ),
        ({"eps_low": 0.0}, "PolicyLossConfig.eps_low=0.0 must be in (0, 1]"),
        (
            {"eps_high": -0.1},
            "PolicyLossConfig.eps_high=-0.1 must be > 0; use e.g. 0.28 (DAPO) or 4e-4 (GSPO).",
        ),
        (
            {"dual_clip": 1.0},
            "PolicyLossConfig.dual_clip=1.0 must be > 1 (it caps -A*r at -c*A for A < 0)"
            "; use e.g. 3.0, or None (off).",
        ),
        ({"dual_clip": 0.5}, "PolicyLossConfig.dual_clip=0.5 must be > 1"),
        (
            {"sigma": 0.0},
            "PolicyLossConfig.sigma=0.0 must be in (0, 1) (the noise is u ~ U(1 - sigma, 1 + sigma))"
            "; use e.g. 0.1.",
        ),
        ({"sigma": 1.0}, "PolicyLossConfig.sigma=1.0 must be in (0, 1)"),
        (
            {"profile": "constant", "delta": 0.0},
            "PolicyLossConfig.delta=0.0 must be > 0 (the band's relative width past the boundary)"
            "; use e.g. 0.1.",
        ),
        (
            {"profile": "constant", "p0": 1.2},
            "PolicyLossConfig.p0=1.2 must be in (0, 1] (a probability); use e.g. 0.5.",
        ),
        ({"p0": 0.0}, "PolicyLossConfig.p0=0.0 must be in (0, 1]"),
        (
            {"profile": "gauss"},
            "PolicyLossConfig.profile='gauss' is not one of 'noise', 'constant', 'linear', 'widening'"
            "; pick one of those.",
        ),
        ({"sides": "left"}, "PolicyLossConfig.sides='left' is not one of 'both', 'upper', 'lower'"),
        ({"aggregation": "mean"}, "PolicyLossConfig.aggregation='mean' is not one of 'token-mean', "),
        (
            {"aggregation": "seq-mean-token-sum-norm"},
            "PolicyLossConfig.max_length=None must be a positive int with "
            "aggregation='seq-mean-token-sum-norm'; set it to the maximum response length.",
        ),
        ({"tis_cap": 0.0}, "PolicyLossConfig.tis_cap=0.0 must be > 0; use e.g. 2.0, or None (off)."),
        (
            {"mis_low": 2.0, "mis_high": 1.0},
            "PolicyLossConfig.mis_low=2.0 must be below mis_high=1.0; swap or widen the bounds.",
        ),
        (
            {"kl_coef": -1.0},
            "PolicyLossConfig.kl_coef=-1.0 must be >= 0; use 0 (no KL penalty) or e.g. 1e-3.",
        ),
        (
            {"hist_edges": (0.0, 0.0)},
            "PolicyLossConfig.hist_edges=(0.0, 0.0) must be 2 to 64 strictly increasing numbers",
        ),
        (
            {"surrogate": "cispo"},
            "PolicyLossConfig.rescue='stochastic' needs surrogate='clip' (CISPO never drops a token)"
            "; use rescue='off'.",
        ),
        (
            {"profile": "constant", "rescued_value": "noisy_ratio"},
            "PolicyLossConfig.rescued_value='noisy_ratio' needs profile='noise'"
            " (profile='constant' draws no noise)",
        ),
    ],
)
def test_validation_messages_name_field_value_and_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PolicyLossConfig(name="nsr", **overrides)  # type: ignore[arg-type]


def test_ignored_settings_warn() -> None:
    with pytest.warns(
        UserWarning, match=re.escape("PolicyLossConfig.sigma=0.05 is ignored by loss 'dapo' (rescue='off')")
    ):
        PolicyLossConfig(name="dapo", sigma=0.05)
    with pytest.warns(
        UserWarning, match=re.escape("PolicyLossConfig.p0=0.9 is ignored by loss 'nsr' (profile='noise')")
    ):
        PolicyLossConfig(name="nsr", p0=0.9)
    with pytest.warns(
        UserWarning,
        match=re.escape(
            "PolicyLossConfig.seed=3 is ignored by loss 'nsr-decay' (rescue='decay' draws nothing)"
        ),
    ):
        PolicyLossConfig(name="nsr-decay", seed=3)
    with pytest.warns(
        UserWarning,
        match=re.escape(
            "PolicyLossConfig.max_length=512 is ignored by loss 'dapo' (aggregation='token-mean')"
        ),
    ):
        PolicyLossConfig(name="dapo", max_length=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PolicyLossConfig(name="nsr", profile="linear", p0=0.9, delta=0.2)  # used: no warning


def test_hist_edges_from_yaml_list_become_a_tuple() -> None:
    assert PolicyLossConfig(name="dapo", hist_edges=[0, 1, 2]).hist_edges == (0, 1, 2)  # type: ignore[arg-type]
