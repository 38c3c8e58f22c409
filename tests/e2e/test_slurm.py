"""``examples/slurm/train.sbatch`` on a real Slurm (22.05, Debian's packages) running as a one-node cluster.

``scripts/slurm_cluster.sh start`` brings the cluster up (``scripts/test.sh`` installs and starts it). The tests
submit the script in its CPU mode (the quickstart under torchrun with 2 gloo processes, through ``srun``):

- with ``sbatch --wait``: exit code 0, and every step in ``metrics.jsonl``;
- cancelled (``scancel``) mid-run after a checkpoint, then submitted again: the second job resumes from the newest
  checkpoint, and the finished run has every step once, with the same values as the uninterrupted run.

Without Slurm the tests fail with the command that sets it up: they are never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nsr_megatron.rollout.weight_sync import free_port
from tests.e2e.test_rl_loop import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"
STEPS = 12
OVERRIDES = (f"run.steps={STEPS} checkpoint.save_interval=2 rollout.prompts_per_step=8 "
             "rollout.samples_per_prompt=4")


@pytest.fixture(scope="module")
def cluster() -> None:
    if shutil.which("sbatch") is None:
        pytest.fail("Slurm is not installed: `bash scripts/slurm_cluster.sh install` (root; scripts/test.sh does).",
                    pytrace=False)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_cluster.sh"), "start"], capture_output=True,
                          text=True, timeout=180)
    if proc.returncode != 0:
        pytest.fail(f"the test Slurm cluster did not start: {proc.stderr.strip()}", pytrace=False)


def _submit(run_dir: Path, out: Path, *, wait: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NSR_CPU": "1", "NSR_CONFIG": "quickstart", "NSR_RUN_DIR": str(run_dir),
           "NSR_PYTHON": sys.executable, "NSR_OVERRIDES": OVERRIDES, "MASTER_PORT": str(free_port())}
    cmd = ["sbatch", "--parsable", f"--job-name=nsr-test-{uuid.uuid4().hex[:8]}", "--nodes=1", "--gpus-per-node=0",
           "--cpus-per-task=2", "--time=00:20:00", f"--output={out}"]
    return subprocess.run([*cmd, *(["--wait"] if wait else []), str(SBATCH)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def job_gone(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
    return out.returncode != 0 or not out.stdout.strip()


def wait_past_a_checkpoint(run_dir: Path, job: str, out: Path, timeout_s: float = 600.0) -> None:
    """Until the job's run has a checkpoint and has trained past it; fails if the job ends first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = run_dir / "status.json"
        step = json.loads(status.read_text()).get("step", 0) if status.exists() else 0
        saved = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
        if saved and step > max(saved):
            return
        assert not job_gone(job), f"the job ended before it was interrupted:\n{out.read_text()[-3000:]}"
        time.sleep(0.1)
    pytest.fail(f"the run did not pass a checkpoint within {timeout_s:.0f} s", pytrace=False)


def assert_every_step_once_as_in(run_dir: Path, straight: Path, steps: int) -> None:
    """The resumed run has each step once, each with the values of the run that was never interrupted."""
    rows, ref = read_metrics(run_dir), read_metrics(straight)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for mine, theirs in zip(rows, ref, strict=True):
        for key in ("reward/mean", "loss", "grad_norm", "clip_frac/upper"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (mine["step"], key)


@pytest.fixture(scope="module")
def straight(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurm")
    proc = _submit(root / "run", root / "job.out", wait=True)
    log = (root / "job.out").read_text() if (root / "job.out").exists() else ""
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}: {proc.stderr}\n{log[-3000:]}"
    return root / "run"


def test_train_sbatch_runs_the_quickstart_under_torchrun(straight: Path) -> None:
    rows = read_metrics(straight)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[0]["grad_norm"] > 0
    log = (straight.parent / "job.out").read_text()
    assert "train.sbatch: job" in log and "1 training node(s) x 2 processes" in log


def test_a_cancelled_job_resubmitted_resumes_with_no_step_lost(straight: Path, tmp_path: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    proc = _submit(run_dir, out, wait=False)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    wait_past_a_checkpoint(run_dir, job, out)
    subprocess.run(["scancel", job], check=True)
    while not job_gone(job):
        time.sleep(0.5)
    done = [r["step"] for r in read_metrics(run_dir)]
    assert done and done[-1] < STEPS, f"the job was not stopped mid-run: {done}"

    proc = _submit(run_dir, out, wait=True)
    assert proc.returncode == 0, f"{proc.stderr}\n{out.read_text()[-3000:]}"
    assert "resumed from" in out.read_text()
    assert_every_step_once_as_in(run_dir, straight, STEPS)


def test_convert_sbatch_converts_and_round_trips(cluster: None, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tests.helpers import make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", seed=2)
    script = ROOT / "examples" / "slurm" / "convert.sbatch"

    def run(**env: str) -> None:
        out = tmp_path / f"{env['NSR_DIRECTION']}.out"
        proc = subprocess.run(["sbatch", "--wait", "--cpus-per-task=1", "--mem=2G", f"--output={out}", str(script)],
                              cwd=ROOT, env={**os.environ, "NSR_PYTHON": sys.executable, **env}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{proc.stderr}\n{out.read_text()[-3000:] if out.exists() else ''}"

    run(NSR_DIRECTION="hf-to-mcore", NSR_HF_DIR=str(hf), NSR_OUT=str(tmp_path / "ckpt"))
    ckpt = tmp_path / "ckpt" / "step_00000000"
    assert ckpt.is_dir()
    run(NSR_DIRECTION="verify", NSR_HF_DIR=str(hf), NSR_CKPT=str(ckpt))
    run(NSR_DIRECTION="mcore-to-hf", NSR_CKPT=str(ckpt), NSR_OUT=str(tmp_path / "back"), NSR_HF_DIR=str(hf))
    before, after = load_file(str(hf / "model.safetensors")), {}
    for f in (tmp_path / "back").glob("*.safetensors"):
        after.update(load_file(str(f)))
    assert after.keys() == before.keys() and all(bool((after[k] == before[k]).all()) for k in before)


def test_eval_sbatch_scores_the_trained_run(straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    env = {**os.environ, "NSR_CPU": "1", "NSR_PYTHON": sys.executable, "NSR_MODEL": str(straight),
           "NSR_DATA": str(straight / "data" / "echo.jsonl"), "NSR_OUT": str(out), "NSR_K": "4",
           "NSR_TEMPERATURE": "1.0", "NSR_TOP_P": "1.0", "NSR_MAX_NEW_TOKENS": "3",
           "NSR_EVAL_ARGS": "reward.name=synthetic reward.executor=thread data.max_samples=16"}
    log = tmp_path / "eval.out"
    proc = subprocess.run(["sbatch", "--wait", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}",
                           str(ROOT / "examples" / "slurm" / "eval.sbatch")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stderr}\n{log.read_text()[-3000:] if log.exists() else ''}"
    result = json.loads(out.read_text())
    assert result["problems"] == 16 and result["k"] == 4 and result["pass@1"] == result["avg@4"]
    assert "| avg@4 | pass@1 | pass@2 | pass@4 | maj@4 |" in log.read_text()
