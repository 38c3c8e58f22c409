"""The RL loop end to end through the real CLI: it learns, resumes exactly, and runs under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None, nproc: int = 1, timeout: int = 900,
            new_session: bool = False) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2", **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "nsr_megatron.cli", *args]
    else:
        cmd = [sys.executable, "-m", "nsr_megatron.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=new_session)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def test_quickstart_learns(tmp_path: Path) -> None:
    run_dir = tmp_path / "qs"
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}")
    _ok(proc)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for key in ("reward/mean", "response_length/mean", "loss", "clip_frac/upper", "clip_frac/lower",
                "rescue_frac", "entropy", "grad_norm", "timing/rollout", "timing/train"):
        assert key in rows[0], f"metrics.jsonl lacks {key}"
    assert any(r["loss"] != 0.0 for r in rows) and any(r["clip_frac"] > 0 for r in rows)
    assert any(r["rescue_frac"] > 0 for r in rows), "NSR never rescued a token"
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last >= first + 0.2, f"reward did not improve enough: first 5 steps {first:.3f}, last 5 {last:.3f}"
    for name in ("reward", "response_length", "entropy", "clip_rescue"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "tb").iterdir())
    assert (run_dir / "checkpoints" / f"step_{len(rows):08d}" / "nsr_meta.json").is_file()


SHORT = ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "checkpoint.save_interval=2"]


def _final_weights(run_dir: Path, step: int, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the final dist checkpoint (weights and Adam state), read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{run_dir.name}.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / f"step_{step:08d}"), str(out))
    state = torch.load(out, weights_only=False)  # a file this test just wrote (holds byte-stream extra state)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_resume_after_kill_is_exact(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(run_cli("quickstart", "--no-progress", f"run.run_dir={straight}", "run.steps=4", *SHORT))
    killed = run_cli("quickstart", "--no-progress", f"run.run_dir={resumed}", "run.steps=4", *SHORT,
                     env={"NSR_KILL_AFTER_STEP": "2"}, new_session=True)
    assert killed.returncode != 0, "the run was supposed to be killed after step 2"
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2]
    _ok(run_cli("quickstart", "--no-progress", f"run.run_dir={resumed}", "run.steps=4", *SHORT,
                "checkpoint.resume=auto"))

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if not key.startswith("timing/"):
                assert rb[key] == value, f"step {ra['step']} {key}: straight {value} vs resumed {rb[key]}"
    wa, wb = _final_weights(straight, 4, tmp_path), _final_weights(resumed, 4, tmp_path)
    assert sorted(wa) == sorted(wb) and any(k.startswith("optimizer.") for k in wa)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"final weight {name} differs after resume"


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.ep=2"],
                                    ["parallel.pp=2"]], ids=["tp2", "ep2", "pp2"])
def test_torchrun_layouts_match_single_process(tmp_path: Path, layout: list[str]) -> None:
    common = ["--no-progress", "run.steps=2", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    _ok(run_cli("quickstart", f"run.run_dir={single}", *common))
    _ok(run_cli("quickstart", f"run.run_dir={multi}", *common, *layout, nproc=2))
    a, b = read_metrics(single), read_metrics(multi)
    assert len(a) == len(b) == 2
    # Step 1 starts from identical weights and draws identical samples: everything matches to rounding.
    assert b[0]["reward/mean"] == a[0]["reward/mean"]
    for key in ("loss", "entropy", "clip_frac/upper", "clip_frac/lower", "rescue_frac", "grad_norm"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-4, abs=1e-5), key
    # Step 2 samples from weights that differ by rounding only; sampling may differ in rare draws.
    assert b[1]["reward/mean"] == pytest.approx(a[1]["reward/mean"], abs=0.1)


def test_bad_inputs_fail_clearly(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1=", "answer": "1"}\n{"prompt": "2=", "answer": \n', encoding="utf-8")
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={tmp_path / 'r1'}", f"data.path={data}", "run.steps=1")
    assert proc.returncode != 0
    assert f"{data}, line 2" in proc.stderr

    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={tmp_path / 'r2'}", "parallel.tp=3")
    assert proc.returncode == 2
    assert "parallel.tp=3 does not divide num_attention_heads=4" in proc.stderr
    assert not (tmp_path / "r2" / "checkpoints").exists()


def test_failing_and_hanging_rewards_score_zero(tmp_path: Path) -> None:
    run_dir = tmp_path / "rw"
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "run.steps=2",
                   "reward.name=tests.e2e.bad_rewards:flaky", "reward.timeout_s=0.5", "reward.executor=process",
                   "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4")
    _ok(proc)
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    assert sum(r["reward/errors"] for r in rows) > 0
    assert sum(r["reward/timeouts"] for r in rows) > 0


def test_kl_reference_dynamic_sampling_and_rollout_logprobs(tmp_path: Path) -> None:
    run_dir = tmp_path / "opts"
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "run.steps=2", "loss.name=grpo",
                   "loss.kl_coef=0.01", "loss.tis_cap=2.0", "loss.mis_low=0.5", "loss.mis_high=2.0",
                   "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=3",
                   "algorithm.old_logprobs=rollout", "optimizer.warmup_steps=4", "optimizer.lr_schedule=cosine",
                   "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4")
    _ok(proc)
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    for r in rows:
        assert "kl_ref" in r and r["kl_ref"] >= 0.0 and r["tis/weight_mean"] == pytest.approx(1.0)
        assert 1 <= r["rollout/rounds"] <= 3
        assert r["rollout/kept_groups"] <= 8
    assert rows[0]["lr"] == pytest.approx(0.5 * rows[1]["lr"])  # linear warm-up over 4 optimizer steps


def test_dense_tied_qwen2_trains(tmp_path: Path) -> None:
    run_dir = tmp_path / "qwen2"
    _ok(run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "run.steps=2", "model.tiny.model_type=qwen2",
                "model.tiny.architectures=[Qwen2ForCausalLM]", "model.tiny.tie_word_embeddings=true",
                "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4"))
    rows = read_metrics(run_dir)
    assert len(rows) == 2 and rows[0]["grad_norm"] > 0
