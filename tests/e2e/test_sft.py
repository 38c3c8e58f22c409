"""``nsr-megatron sft`` through the real CLI: it learns (held-out loss and accuracy), TP2+SP, EP2 and PP2 under
torchrun train like one process, a resumed run equals a straight one, and its checkpoint is what ``train`` starts
from and ``eval`` reads. Data handling and refusals on one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_rl_loop import _ok, read_metrics, run_cli
from tests.helpers import make_tiny_model, write_jsonl

COMMON = ["--no-progress", "sft.batch_size=16", "optimizer.lr=3e-3", "sft.max_tokens_per_micro_batch=64"]


def _rows() -> list[dict[str, str]]:
    """a+b= -> (a+b) mod 10, all 100 pairs."""
    return [{"prompt": f"{a}+{b}=", "response": str((a + b) % 10)} for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    rows = _rows()
    train = [r for i, r in enumerate(rows) if i % 5]
    held = [r for i, r in enumerate(rows) if i % 5 == 0]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    return {"hf": make_tiny_model(root / "hf"), "train": write_jsonl(root / "train.jsonl", train),
            "eval": write_jsonl(root / "eval.jsonl", held), "root": root}


def _args(task: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [*COMMON, f"model.hf_path={task['hf']}", f"data.path={task['train']}", f"sft.eval_data={task['eval']}",
            f"run.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def single(task: dict[str, Path]) -> Path:
    """One process, 30 steps, held-out evaluation every 10, a checkpoint every 10."""
    run_dir = task["root"] / "single"
    proc = run_cli("sft", *_args(task, run_dir, "run.steps=30", "sft.eval_interval=10", "checkpoint.save_interval=10",
                                 "checkpoint.keep_last=5"))
    _ok(proc)
    assert "sft: 30 steps" in proc.stdout and "held-out loss" in proc.stdout
    return run_dir


def test_sft_learns_the_held_out_set(single: Path) -> None:
    rows = read_metrics(single)
    assert [r["step"] for r in rows] == list(range(1, 31))
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["eval/examples"] == 20 for r in evals)
    # the untrained model's loss per token is about log(vocab); after SFT the held-out loss is far below it
    assert evals[-1]["eval/loss"] < 0.5 * rows[0]["loss"]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[-1]["eval/token_accuracy"] > 0.5  # the stop token at least, and some digits
    assert 0.0 <= evals[-1]["eval/exact_match"] <= 1.0
    for r in rows:
        assert r["sft/tokens"] == 32  # 16 examples x (1 digit + the stop token): responses only
        assert r["grad_norm"] is not None and r["grad_norm"] > 0


def test_a_resumed_sft_run_equals_a_straight_one(task: dict[str, Path], single: Path) -> None:
    """Stopped after step 10's checkpoint (the straight run's own, copied), resumed to 20: the same steps."""
    import shutil

    run_dir = task["root"] / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(single / "checkpoints" / "step_00000010", run_dir / "checkpoints" / "step_00000010")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(single)[:10]))
    _ok(run_cli("sft", *_args(task, run_dir, "run.steps=20", "sft.eval_interval=10", "checkpoint.resume=auto")))
    straight, resumed = read_metrics(single)[:20], read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 21))
    for a, b in zip(straight[10:], resumed[10:], strict=True):
        for key in ("loss", "grad_norm", "sft/epoch"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert resumed[-1]["eval/loss"] == pytest.approx(straight[-1]["eval/loss"], rel=1e-6)


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.ep=2"],
                                    ["parallel.pp=2"]], ids=["tp2", "ep2", "pp2"])
def test_sft_layouts_match_single_process(task: dict[str, Path], single: Path, layout: list[str]) -> None:
    """The same 3 steps under torchrun: the loss, gradient norm and held-out metrics of one process."""
    run_dir = task["root"] / ("multi-" + "-".join(layout))
    _ok(run_cli("sft", *_args(task, run_dir, "run.steps=3", "sft.eval_interval=3", *layout), nproc=2))
    one = [r for r in read_metrics(single)[:3]]
    two = read_metrics(run_dir)
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (layout, a["step"], key)
    # held-out metrics of step 3 (the single run evaluates at 10; evaluate it at 3 on one process to compare)
    ref_dir = task["root"] / "single-3"
    if not (ref_dir / "metrics.jsonl").exists():
        _ok(run_cli("sft", *_args(task, ref_dir, "run.steps=3", "sft.eval_interval=3")))
    ref = read_metrics(ref_dir)[-1]
    for key in ("eval/loss", "eval/token_accuracy", "eval/exact_match", "eval/examples"):
        assert two[-1][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (layout, key)


def test_the_sft_checkpoint_trains_and_evaluates(task: dict[str, Path], single: Path, tmp_path: Path) -> None:
    step = single / "checkpoints" / "step_00000030"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "answer": r["response"]}
                                                       for i, r in enumerate(_rows()) if i % 5 == 0])
    out = tmp_path / "eval.json"
    _ok(run_cli("eval", "--model", str(step), "--data", str(prompts), "--out", str(out), "--k", "1",
                "--max-new-tokens", "4", "--no-progress", "reward.name=exact_match"))
    report = json.loads(out.read_text())
    assert report["problems"] == 20 and 0.0 <= report["pass@1"] <= 1.0
    run_dir = tmp_path / "rl"
    _ok(run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", f"model.hf_path={task['hf']}",
                f"checkpoint.load={step}", f"data.path={prompts}", "run.steps=1", "rollout.prompts_per_step=4",
                "rollout.samples_per_prompt=2", "reward.name=exact_match"))
    assert len(read_metrics(run_dir)) == 1


def test_messages_records_and_refusals(task: dict[str, Path], tmp_path: Path) -> None:
    """Chat records learn their last assistant turn; a held-out set that shares a prompt with training, a response
    missing, and a batch larger than the data each get one line naming the problem, before any process group."""
    msgs = write_jsonl(tmp_path / "msgs.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
        for r in _rows()[1:40]])
    _ok(run_cli("sft", *_args(task, tmp_path / "m", "run.steps=2"), f"data.path={msgs}", "sft.eval_data="))
    assert len(read_metrics(tmp_path / "m")) == 2

    overlap = write_jsonl(tmp_path / "overlap.jsonl", _rows()[:3])  # prompts 0+0=, 0+1=, 0+2=; train has 0+1=
    proc = run_cli("sft", *_args(task, tmp_path / "o", "run.steps=1"), f"sft.eval_data={overlap}")
    assert proc.returncode != 0 and "2 of its 3 prompts also occur in data.path (first: '" in proc.stderr
    assert "0+1=" in proc.stderr.split("(first: ")[1]  # the rendered prompt (the template's tokens around it)
    assert "Traceback" not in proc.stderr

    no_response = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    proc = run_cli("sft", *_args(task, tmp_path / "b", "run.steps=1"), f"data.path={no_response}", "sft.eval_data=")
    assert proc.returncode != 0 and "line 1: sft.response_key='response': missing field 'response'" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = run_cli("sft", *_args(task, tmp_path / "c", "run.steps=1"), "sft.batch_size=500")
    assert proc.returncode != 0 and "sft.batch_size=500 is larger than the 80 training examples" in proc.stderr
