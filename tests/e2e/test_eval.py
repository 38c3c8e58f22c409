"""``nsr-megatron eval`` end to end: a training checkpoint (converted on the fly) gives exactly what its
``tools/convert.py mcore-to-hf`` conversion gives with the same seeds, on the embedded engine and through the
project's rollout server; the JSON holds the summary and the per-problem results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_rl_loop import ROOT, _ok, run_cli

EVAL = ["--k", "4", "--max-new-tokens", "3", "--seed", "7", "--no-progress", "reward.name=synthetic",
        "reward.executor=thread", "data.max_samples=24"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run"
    _ok(run_cli("quickstart", "--no-progress", f"run.run_dir={run}", "run.steps=2", "rollout.prompts_per_step=8",
                "rollout.samples_per_prompt=4"))
    return run


def _eval(model: Path, data: Path, out: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    proc = run_cli("eval", "--model", str(model), "--data", str(data), "--out", str(out), *EVAL, *extra)
    _ok(proc)
    assert "| avg@4 | pass@1 | pass@2 | pass@4 | maj@4 |" in proc.stdout
    return dict(json.loads(out.read_text()))


def test_a_checkpoint_evaluates_like_its_conversion(trained: Path, tmp_path: Path) -> None:
    hf, data = tmp_path / "hf", trained / "data" / "echo.jsonl"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), "mcore-to-hf", "--ckpt",
                    str(trained / "checkpoints" / "step_00000002"), "--out", str(hf), "--no-progress"], check=True,
                   capture_output=True)
    from_ckpt = _eval(trained, data, tmp_path / "a.json")
    from_hf = _eval(hf, data, tmp_path / "b.json")
    assert "converted" in from_ckpt["model"]
    keys = ["avg@4", "pass@1", "pass@2", "pass@3", "pass@4", "maj@4"]
    assert {k: from_ckpt[k] for k in keys} == {k: from_hf[k] for k in keys}
    assert [p["responses"] for p in from_ckpt["per_problem"]] == [p["responses"] for p in from_hf["per_problem"]]
    assert from_ckpt["pass@1"] == from_ckpt["avg@4"] and from_ckpt["problems"] == 24
    assert 0 < from_ckpt["pass@4"] <= 1 and from_ckpt["pass@1"] <= from_ckpt["pass@4"]
    first = from_ckpt["per_problem"][0]
    assert set(first) >= {"prompt", "answer", "responses", "rewards", "correct", "final_answers"}
    assert len(first["responses"]) == 4

    # The project's rollout server keys each problem's draws by its seed: the same samples as in-process.
    served = _eval(trained, data, tmp_path / "c.json", "rollout.backend=server")
    assert [p["responses"] for p in served["per_problem"]] == [p["responses"] for p in from_ckpt["per_problem"]]


def test_eval_refuses_bad_input(trained: Path, tmp_path: Path) -> None:
    proc = run_cli("eval", "--model", str(tmp_path), "--data", str(trained / "data" / "echo.jsonl"), "--out",
                   str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "neither a Hugging Face folder (config.json) nor a training checkpoint" in \
        proc.stderr
    proc = run_cli("eval", "--model", str(trained), "--data", str(trained / "data" / "echo.jsonl"), "--out",
                   str(tmp_path / "x.json"), "optimizer.lr=1")
    assert proc.returncode == 2 and "eval takes overrides of data.*, reward.*, rollout.* and model.* only" in \
        proc.stderr


def test_evaluation_inside_training_survives_a_resume(trained: Path, tmp_path: Path) -> None:
    from tests.e2e.test_rl_loop import read_metrics

    data = trained / "data" / "echo.jsonl"
    common = ["--no-progress", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "eval.interval=2",
              f"eval.data={data}", "eval.k=2", "eval.max_problems=12", "checkpoint.save_interval=2",
              "optimizer.lr_schedule=constant"]  # the same schedule whatever run.steps says
    straight = tmp_path / "straight"
    _ok(run_cli("quickstart", f"run.run_dir={straight}", "run.steps=4", *common))
    rows = read_metrics(straight)
    assert [r["step"] for r in rows if "eval/pass@1" in r] == [2, 4]
    assert all(r["eval/pass@1"] == r["eval/avg@2"] and 0 <= r["eval/pass@2"] <= 1 for r in rows if "eval/pass@1" in r)
    assert (straight / "plots" / "eval.png").is_file()

    resumed = tmp_path / "resumed"
    _ok(run_cli("quickstart", f"run.run_dir={resumed}", "run.steps=2", *common))
    _ok(run_cli("quickstart", f"run.run_dir={resumed}", "run.steps=4", "checkpoint.resume=auto", *common))
    again = read_metrics(resumed)
    keys = ["eval/avg@2", "eval/pass@1", "eval/pass@2", "eval/maj@2"]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [[r.get(k) for k in keys] for r in again] == [[r.get(k) for k in keys] for r in rows]


def test_compare_runs_losses_and_seeds_resumably(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--losses", "dapo,nsr", "--seeds", "2", "--out", str(out), "run.steps=3",
            "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "checkpoint.save_interval=0"]
    proc = run_cli(*args)
    _ok(proc)
    table = (out / "compare.md").read_text()
    assert "| reward/mean | dapo | 2 |" in table and "| rescue_frac | nsr | 2 |" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An interrupted comparison continues: only the missing runs train again, here two at once (--jobs 2, each
    # with the OMP_NUM_THREADS the test sets), and the results are the same.
    import shutil

    shutil.rmtree(out / "runs" / "nsr-seed2")
    shutil.rmtree(out / "runs" / "dapo-seed1")
    proc = run_cli(*args, "--jobs", "2")
    _ok(proc)
    assert proc.stdout.count("done before, kept") == 2, proc.stdout
    assert "nsr seed 2: training" in proc.stdout and "dapo seed 1: training" in proc.stdout
    assert (out / "compare.md").read_text() == table
