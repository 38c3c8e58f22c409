"""The routing profiler in real runs: scalars, routing.jsonl, plots, the profile command's trace and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_rl_loop import _ok, read_metrics, run_cli

# A high learning rate and 4 optimizer steps per rollout batch: tokens go past the clip boundary within 4 steps.
CLIPPING = ["--no-progress", "run.steps=4", "optimizer.lr=2e-2", "algorithm.mini_batches=4",
            "rollout.prompts_per_step=8", "rollout.samples_per_prompt=8"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("routing") / "run"
    _ok(run_cli("quickstart", f"run.run_dir={run_dir}", *CLIPPING, "profile.routing=full"))
    return run_dir


def test_full_mode_writes_scalars_per_expert_counts_and_plots(full_run: Path) -> None:
    rows = read_metrics(full_run)
    routing = [json.loads(line) for line in (full_run / "routing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in routing] == [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("routing/imbalance_max_mean", "routing/imbalance_cv", "routing/dead_expert_frac",
                "routing/entropy", "routing/topk_margin", "routing/drift_old_train"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert any(r["routing/drift_old_train"] > 0 for r in rows)  # later mini-batches train on moved routers
    k = 2  # the quickstart model routes each token to 2 experts
    clipped_any = False
    for line, r in zip(routing, rows, strict=True):
        assert len(line["layers"]) == 2 and all(len(layer["load"]) == 4 for layer in line["layers"])
        for layer in line["layers"]:
            assert sum(layer["load"]) == k * layer["tokens"]
            # every token the loss clipped, saw in the band or rescued appears k times among the experts
            for key, frac in (("clipped", "clip_frac"), ("band", "band_frac"), ("rescued", "rescue_frac")):
                assert sum(layer[key]) == pytest.approx(k * r[frac] * r["tokens"], abs=1e-6), (r["step"], key)
        clipped_any |= r["clip_frac"] > 0
    assert clipped_any, "no token was clipped: the test would not check the per-expert counts"
    for name in ("routing_load", "routing_drift", "routing_rescue"):
        png = full_run / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_counters_mode_gives_the_scalars_only(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _ok(run_cli("quickstart", f"run.run_dir={run_dir}", "--no-progress", "run.steps=2",
                "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "profile.routing=counters"))
    rows = read_metrics(run_dir)
    assert all("routing/entropy" in r for r in rows)
    assert not (run_dir / "routing.jsonl").exists() and not (run_dir / "plots" / "routing_load.png").exists()


def test_report_of_an_existing_run(full_run: Path) -> None:
    proc = run_cli("report", str(full_run))
    _ok(proc)
    report = (full_run / "report.md").read_text()
    assert "| expert | share of routed tokens | share of clipped tokens | share of rescued tokens |" in report
    assert "(`routing/drift_old_train`)" in report and "![routing_load](plots/routing_load.png)" in report


def test_profile_writes_a_trace_with_the_phases_and_the_report(tmp_path: Path) -> None:
    out = tmp_path / "prof"
    proc = run_cli("profile", "--steps", "2", "--out", str(out), "rollout.prompts_per_step=8",
                   "rollout.samples_per_prompt=4")
    _ok(proc)
    (trace,) = (out / "trace").glob("*.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"nsr/rollout", "nsr/rewards", "nsr/logprobs", "nsr/train", "nsr/weight_sync"} <= names
    report = (out / "report.md").read_text()
    assert "routing/imbalance_max_mean" in report and "## Trace" in report
    assert (out / "routing.jsonl").is_file()


def test_r2_replay_trains_on_the_old_passes_routing(tmp_path: Path, full_run: Path) -> None:
    # The same run as full_run, whose later mini-batches drift from the old pass (asserted there), with R2.
    run_dir = tmp_path / "run"
    _ok(run_cli("quickstart", f"run.run_dir={run_dir}", *CLIPPING, "profile.routing=counters",
                "algorithm.routing_replay=R2"))
    rows = read_metrics(run_dir)
    assert [r["routing/drift_old_train"] for r in rows] == [0.0] * 4
    assert rows[0]["grad_norm"] > 0  # it trained (a later step may find no group with unequal rewards)
    assert any(r["routing/drift_old_train"] > 0 for r in read_metrics(full_run))


def test_r3_replay_trains_on_the_engines_routing_over_http(tmp_path: Path) -> None:
    # The project's rollout server returns each token's experts (SGLang's routed_experts); training replays them.
    run_dir = tmp_path / "run"
    _ok(run_cli("quickstart", f"run.run_dir={run_dir}", *CLIPPING, "profile.routing=counters",
                "algorithm.routing_replay=R3", "rollout.backend=server"))
    rows = read_metrics(run_dir)
    assert [r["routing/drift_rollout_train"] for r in rows] == [0.0] * 4
    assert rows[0]["grad_norm"] > 0  # it trained (a later step may find no group with unequal rewards)
