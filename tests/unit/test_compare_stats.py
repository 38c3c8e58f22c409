"""Honest statistics of ``nsr-megatron compare`` on hand-made run directories (``metrics.jsonl`` and ``config.yaml``
as a run writes them), and the run seed reaching every stream of draws. Nothing here trains."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from nsr_megatron.config import Config, load_config
from nsr_megatron.data.datasets import EpochSampler
from nsr_megatron.losses.rng import derive_seed, uniform
from nsr_megatron.telemetry.compare import (
    Z975,
    aggregate,
    final_value,
    interval,
    read_eval_problems,
    read_runs,
    report,
    t_cdf,
    t_quantile,
    wilson,
)


def _write_run(path: Path, rows: list[dict[str, Any]], config: dict[str, Any] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _flat(path: Path, reward: float, steps: int = 10, **eval_points: float) -> Path:
    """A run whose reward is ``reward`` at every step; ``eval_points`` = {"s<step>": pass@1}."""
    evals = {int(k[1:]): v for k, v in eval_points.items()}
    rows = [{"step": t, "reward/mean": reward, "entropy": 1.0, **({"eval/pass@1": evals[t]} if t in evals else {})}
            for t in range(1, steps + 1)]
    return _write_run(path, rows)


# ----------------------------------------------------------------------------------------------- distributions
@pytest.mark.parametrize("dof, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262),
                                           (19, 2.093), (30, 2.042), (60, 2.000), (120, 1.980)])
def test_t_quantile_matches_the_tables(dof: int, expected: float) -> None:
    assert t_quantile(0.975, dof) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(0.025, dof) == pytest.approx(-t_quantile(0.975, dof), rel=1e-12)
    assert t_cdf(t_quantile(0.975, dof), dof) == pytest.approx(0.975, abs=1e-10)


def test_t_quantile_closed_forms_and_normal_limit() -> None:
    # dof 1 is Cauchy: tan(pi (p - 1/2)); dof 2: (2p - 1) / sqrt(2 p (1 - p)).
    for p in (0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)
    assert t_quantile(0.975, 100_000) == pytest.approx(1.959964, abs=1e-4)
    with pytest.raises(ValueError, match="p must lie in"):
        t_quantile(1.0, 3)


def test_interval_uses_the_exact_quantile() -> None:
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_wilson_stays_in_the_unit_interval() -> None:
    z2 = Z975**2
    assert wilson(0.0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))  # [0, z^2 / (n + z^2)]
    assert wilson(1.0, 10) == (pytest.approx(10 / (10 + z2)), 1.0)  # [n / (n + z^2), 1]
    assert wilson(18 / 20, 20) == pytest.approx((0.6990, 0.9721), abs=1e-4)  # the textbook 18 of 20
    for n in (1, 2, 5, 32, 1000):
        for p in (0.0, 1 / n, 0.5, 1 - 1 / n, 1.0):
            low, high = wilson(p, n)
            assert 0.0 <= low <= p <= high <= 1.0


# ----------------------------------------------------------------------------------------------- finals
def test_final_is_the_last_tenth_for_train_and_eval_metrics() -> None:
    rows = [{"step": t, "reward/mean": t / 100, **({"eval/pass@1": t / 40} if t % 5 == 0 else {})}
            for t in range(1, 21)]
    reward = final_value(rows, "reward/mean")
    assert reward is not None and reward["window"] == 2 and reward["points"] == 2
    assert reward["final"] == pytest.approx((0.19 + 0.20) / 2)
    ev = final_value(rows, "eval/pass@1")  # eval at 5, 10, 15, 20; the window is steps 19-20: one point
    assert ev is not None and (ev["points"], ev["final"]) == (1, pytest.approx(0.5))
    # 30 steps, eval at 10, 20, 29, 30: the window (steps 28-30) holds two eval points.
    rows = [{"step": t, "reward/mean": 0.0, **({"eval/pass@1": t / 100} if t in (10, 20, 29, 30) else {})}
            for t in range(1, 31)]
    ev = final_value(rows, "eval/pass@1")
    assert ev is not None and (ev["points"], ev["final"]) == (2, pytest.approx(0.295))
    # No eval point in the window: the last one, alone.
    rows = [{"step": t, "reward/mean": 0.0, **({"eval/pass@1": t / 100} if t in (5, 10, 15) else {})}
            for t in range(1, 21)]
    ev = final_value(rows, "eval/pass@1")
    assert ev is not None and (ev["points"], ev["final"]) == (1, pytest.approx(0.15))
    assert final_value(rows, "band_frac") is None
    # A 5-step run still averages one point; tail sets the window.
    short = [{"step": t, "reward/mean": float(t)} for t in range(1, 6)]
    assert final_value(short, "reward/mean") == {"final": 5.0, "best": 5.0, "points": 1, "window": 1, "last_step": 5}
    assert final_value(short, "reward/mean", tail=2)["final"] == 4.5  # type: ignore[index]


def test_read_runs_keeps_the_last_row_of_a_step_and_skips_a_torn_line(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r", [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.2},
                                      {"step": 2, "reward/mean": 0.3}])
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "rew')
    rows = read_runs({"a": {1: run}})["a"][1]
    assert [(r["step"], r["reward/mean"]) for r in rows] == [(1, 0.1), (2, 0.3)]


# ----------------------------------------------------------------------------------------------- paired
def test_paired_difference_by_hand_with_an_unpaired_seed(tmp_path: Path) -> None:
    base = {s: _flat(tmp_path / f"dapo{s}", 0.5) for s in range(1, 6)}
    nsr_rewards = {1: 0.6, 2: 0.7, 3: 0.45, 4: 0.65, 5: 0.5, 6: 0.9}  # seed 6 has no dapo run
    other = {s: _flat(tmp_path / f"nsr{s}", r) for s, r in nsr_rewards.items()}
    summary = aggregate(read_runs({"dapo": base, "nsr": other}), baseline="dapo")
    (row,) = [r for r in summary["paired"] if r["metric"] == "reward/mean"]
    # d = 0.1, 0.2, -0.05, 0.15, 0: mean 0.08; squared deviations .0004 .0144 .0169 .0049 .0064 sum to .043,
    # sd = sqrt(.043 / 4) = 0.103682; half = t(0.975, 4) * sd / sqrt(5) = 2.776445 * 0.103682 / 2.236068 = 0.128738.
    assert row["pairs"] == 5 and row["seeds"] == [1, 2, 3, 4, 5]
    assert row["mean"] == pytest.approx(0.08)
    assert row["half"] == pytest.approx(2.776445 * math.sqrt(0.043 / 4) / math.sqrt(5), rel=1e-6)
    assert row["half"] == pytest.approx(0.128738, abs=1e-6)
    assert (row["low"], row["high"]) == (pytest.approx(0.08 - 0.128738, abs=1e-6), pytest.approx(0.208738, abs=1e-6))
    assert (row["wins"], row["losses"], row["ties"]) == (3, 1, 1)
    assert row["only_other"] == [6] and row["only_base"] == []
    assert (row["group"], row["base"], row["aa"]) == ("nsr", "dapo", False)
    # The per-loss table still counts every seed a group ran.
    assert summary["metrics"]["reward/mean"]["nsr"]["seeds"] == 6
    text = report(summary)
    assert "| reward/mean | nsr - dapo | 5 | +0.0800 | [-0.0487, +0.2087] | no | 3 / 1 / 1 | nsr seeds 6 (none in dapo) |" \
        in text
    assert "Unpaired seeds, left out of the paired rows: nsr seed 6." in text
    # entropy has no better direction: the counts read higher / lower / equal.
    assert "| entropy | nsr - dapo | 5 | +0.0000 | [+0.0000, +0.0000] | no | 0 higher / 0 lower / 5 equal |" in text


def test_one_pair_has_no_interval_and_an_unknown_baseline_is_named(tmp_path: Path) -> None:
    data = read_runs({"dapo": {1: _flat(tmp_path / "d", 0.2)}, "nsr": {1: _flat(tmp_path / "n", 0.3)}})
    (row,) = [r for r in aggregate(data, baseline="dapo")["paired"] if r["metric"] == "reward/mean"]
    assert row["mean"] == pytest.approx(0.1) and row["half"] is None and row["low"] is None
    assert "n/a (1 pair)" in report(aggregate(data, baseline="dapo"))
    with pytest.raises(ValueError, match="'gspo' names no group"):
        aggregate(data, baseline="gspo")


def test_aa_row_is_the_noise_floor_beside_the_real_comparisons(tmp_path: Path) -> None:
    runs = {"dapo": {s: _flat(tmp_path / f"d{s}", 0.5) for s in (1, 2, 3)},
            "dapo-aa": {s: _flat(tmp_path / f"a{s}", r) for s, r in ((1, 0.52), (2, 0.47), (3, 0.51))},
            "nsr": {s: _flat(tmp_path / f"n{s}", r) for s, r in ((1, 0.7), (2, 0.8), (3, 0.75))}}
    summary = aggregate(read_runs(runs), baseline="dapo", aa=("dapo", "dapo-aa"))
    rows = [r for r in summary["paired"] if r["metric"] == "reward/mean"]
    assert [(r["group"], r["aa"]) for r in rows] == [("dapo-aa", True), ("nsr", False)]  # no "dapo-aa - dapo" twice
    floor, real = rows
    d = [0.02, -0.03, 0.01]
    assert floor["mean"] == pytest.approx(statistics.fmean(d))
    assert floor["half"] == pytest.approx(t_quantile(0.975, 2) * statistics.stdev(d) / math.sqrt(3))
    assert (floor["wins"], floor["losses"]) == (2, 1)
    assert real["low"] > floor["high"]  # a difference past the floor
    text = report(summary)
    assert "| reward/mean | A/A noise floor: dapo-aa - dapo | 3 |" in text
    assert text.index("A/A noise floor: dapo-aa - dapo | 3") < text.index("| reward/mean | nsr - dapo |")
    json.dumps(summary)  # compare.json


def test_proportions_keep_their_intervals_in_the_unit_interval(tmp_path: Path) -> None:
    problems = tmp_path / "eval.jsonl"
    problems.write_text("".join(json.dumps({"prompt": f"{i}=", "answer": str(i)}) + "\n" for i in range(32)))
    config = {"eval": {"interval": 5, "data": str(problems), "max_problems": 0}}
    runs: dict[int, Path] = {}
    for seed, last in ((1, 1.0), (2, 1.0), (3, 0.8)):
        rows = [{"step": t, "reward/mean": 0.5, **({"eval/pass@1": last} if t % 5 == 0 else {})} for t in range(1, 21)]
        runs[seed] = _write_run(tmp_path / f"r{seed}", rows, config)
    assert read_eval_problems(runs[1]) == 32
    assert read_eval_problems(tmp_path) is None  # no config.yaml
    summary = aggregate(read_runs({"nsr": runs}), problems={"nsr": {s: read_eval_problems(d) for s, d in runs.items()}})
    s = summary["metrics"]["eval/pass@1"]["nsr"]
    assert s["final"] + s["final_ci"] > 1.0 and s["final_high"] == 1.0 and 0.0 <= s["final_low"] < s["final"]
    assert s["points"] == [1, 1, 1]
    assert s["runs"][1]["wilson"] == [pytest.approx(32 / (32 + Z975**2)), 1.0]
    assert s["runs"][3]["wilson"] == pytest.approx(list(wilson(0.8, 32)))
    assert summary["metrics"]["reward/mean"]["nsr"]["runs"][1]["wilson"] is None
    text = report(summary)
    assert "| eval/pass@1 | nsr | 1 | 1.0000 | 1 | 32 | [0.8928, 1.0000] |" in text


def test_cli_aggregates_finished_runs_only_with_no_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nsr_megatron.cli import main

    out = tmp_path / "cmp"
    for label, seed, reward in (("dapo", 1, 0.5), ("dapo", 2, 0.6), ("nsr", 1, 0.7), ("nsr", 2, 0.8),
                                ("nsr", 3, 0.9), ("dapo-aa", 1, 0.55), ("dapo-aa", 2, 0.58)):
        run = _flat(out / "runs" / f"{label}-seed{seed}", reward)
        (run / "status.json").write_text(json.dumps({"phase": "done"}))
    code = main(["compare", "--losses", "dapo,nsr", "--seeds", "3", "--out", str(out), "--baseline", "dapo",
                 "--aa", "dapo", "--no-train"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "compare: dapo seed 3: not done" in printed and "left out (--no-train)" in printed
    assert "A/A noise floor: dapo-aa - dapo | 2 |" in printed and "| reward/mean | nsr - dapo | 2 |" in printed
    assert "nsr seed 3" in printed  # unpaired, named
    summary = json.loads((out / "compare.json").read_text())
    assert summary["baseline"] == "dapo" and summary["aa"] == ["dapo", "dapo-aa"]
    assert main(["compare", "--losses", "dapo,nsr", "--baseline", "gspo", "--out", str(out), "--no-train"]) == 2


def test_compare_names_what_the_config_changes_in_each_compared_preset(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from nsr_megatron.cli import main
    from nsr_megatron.losses import PolicyLossConfig

    assert PolicyLossConfig(name="cispo", eps_high=0.07).departures() == {"eps_high": (0.07, 0.28)}
    assert PolicyLossConfig(name="nsr", seed=5).departures() == {}  # runs derive the seed: not a departure
    # The arithmetic task narrows eps for every loss it trains: compare says what that does to each preset.
    code = main(["compare", "--task", "arithmetic", "--losses", "dapo,clip-cov", "--seeds", "1",
                 "--out", str(tmp_path / "cmp"), "--no-train"])
    assert code == 2  # nothing trained
    printed = capsys.readouterr().out
    assert "compare: dapo runs with loss.eps_low=0.05 (its preset: 0.2), loss.eps_high=0.07 (its preset: 0.28)" \
        in printed
    assert "compare: clip-cov runs with loss.eps_low=0.05 (its preset: 1.0), loss.eps_high=0.07 (its preset: 1.0)" \
        in printed
    main(["compare", "--task", "arithmetic", "--losses", "clip-cov", "--seeds", "1", "--out", str(tmp_path / "cmp"),
          "--no-train", "loss.eps_low=1.0", "loss.eps_high=1.0"])
    assert "clip-cov runs with" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- seeds
def test_the_run_seed_varies_prompt_order_and_rescue_draws() -> None:
    configs: dict[int, Config] = {s: load_config(None, ["loss.name=nsr", f"run.seed={s}"]) for s in (1, 2)}
    again: Config = load_config(None, ["loss.name=nsr", "run.seed=1"])

    def order(c: Config) -> list[int]:
        return EpochSampler(64, 8, seed=c.data.shuffle_seed or 0).epoch_order(0)

    def draws(c: Config) -> torch.Tensor:
        return uniform(c.loss.seed, 3, torch.arange(8)[:, None], torch.arange(16)[None, :])  # [8, 16]

    assert order(configs[1]) != order(configs[2]) and order(configs[1]) == order(again)
    assert not torch.equal(draws(configs[1]), draws(configs[2])) and torch.equal(draws(configs[1]), draws(again))
    assert configs[1].rollout.sampling_seed == 1 and configs[2].rollout.sampling_seed == 2  # as before: run.seed
    assert configs[1].loss.seed == derive_seed(1, "rescue")


def test_explicit_stream_seeds_are_kept_so_an_aa_pair_varies_only_the_draws() -> None:
    fixed = ["data.shuffle_seed=7", "loss.seed=3", "rollout.sampling_seed=5"]
    a, b = (load_config(None, ["loss.name=nsr", f"run.seed={s}", *fixed], Config) for s in (1, 2))
    assert (a.data.shuffle_seed, a.loss.seed, a.rollout.sampling_seed) == (7, 3, 5)
    assert (b.data.shuffle_seed, b.loss.seed, b.rollout.sampling_seed) == (7, 3, 5)
    # The A/A repeat of compare: the same run seed (same prompt order), other sampling and rescue seeds.
    base: Config = load_config(None, ["loss.name=nsr", "run.seed=4"])
    rep: Config = load_config(None, ["loss.name=nsr", "run.seed=4", f"rollout.sampling_seed={derive_seed(4, 'aa/sampling')}",
                             f"loss.seed={derive_seed(4, 'aa/rescue')}"])
    assert base.data.shuffle_seed == rep.data.shuffle_seed
    assert base.rollout.sampling_seed != rep.rollout.sampling_seed and base.loss.seed != rep.loss.seed


def test_a_loss_that_draws_nothing_keeps_its_seed_and_warns_nothing(recwarn: pytest.WarningsRecorder) -> None:
    assert load_config(None, ["loss.name=dapo", "run.seed=9"]).loss.seed == 0
    assert load_config(None, ["loss.name=nsr-decay", "run.seed=9"]).loss.seed == 0
    assert not [w for w in recwarn if "PolicyLossConfig" in str(w.message)]


def test_quickstart_config_is_deterministic_for_a_seed() -> None:
    from nsr_megatron.cli import task_config

    for task in ("echo", "repeat"):
        one, two = (load_config(task_config(task), ["run.seed=3"], Config) for _ in range(2))
        assert (one.data.shuffle_seed, one.loss.seed, one.rollout.sampling_seed) == \
            (two.data.shuffle_seed, two.loss.seed, two.rollout.sampling_seed)
    assert derive_seed(3, "rescue") == derive_seed(3, "rescue") != derive_seed(3, "shuffle/0")
    assert 0 <= derive_seed(-1, "rescue") < 2**63


def test_every_loss_that_draws_gets_a_seed_from_the_run(recwarn: pytest.WarningsRecorder) -> None:
    from nsr_megatron.config import loss_draws
    from nsr_megatron.losses import PRESETS

    for name in PRESETS:
        config: Config = load_config(None, [f"loss.name={name}", "run.seed=5"])
        expected = derive_seed(5, "rescue") if loss_draws(config.loss) else PRESETS[name]["seed"]
        assert config.loss.seed == expected, name
    assert loss_draws(load_config(None, ["loss.name=nsr"]).loss)
    assert not loss_draws(load_config(None, ["loss.name=dapo"]).loss)
    assert not [w for w in recwarn if "PolicyLossConfig" in str(w.message)]
