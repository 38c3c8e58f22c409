"""``nsr-megatron quickstart --task arithmetic`` through the CLI, with a short SFT config: the warm start is made once
and reused by the next run of the same seed (also when two runs start at once), RL starts from its checkpoint, and
the starting weights are evaluated on the held-out questions before the first step."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_rl_loop import ROOT, _command, _ok, read_metrics, run_cli

# The learning test's bounds, for the task as shipped (NSR, eps 0.05 / 0.07). Measured at commit fa06431 with those
# eps: at one thread over seeds 1-20 (docs/EVIDENCE.md's nsr runs) the rise of held-out pass@1 was +0.013 to +0.098,
# the mean clipped share 0.057-0.086 and its largest step 0.079-0.143; at two threads over seeds 1-4 the rise was
# +0.076, +0.013, +0.055 and +0.073, the mean clipped share 0.066-0.086. The test runs seed 1 at one thread and
# seed 4 at two: seed 2's rise (+0.013 at both thread counts) is too near 0 for a test.
RISE = 0.0
CLIPPED_MEAN, CLIPPED_MAX = 0.05, 0.08


def test_the_warm_start_is_made_once_and_rl_starts_from_it(tmp_path: Path) -> None:
    sft_config = tmp_path / "sft.yaml"
    sft_config.write_text("optimizer: {lr: 1.0e-2}\nsft: {batch_size: 16, eval_interval: 0}\nrun: {steps: 4}\n")
    common = ["--task", "arithmetic", "--sft-config", str(sft_config), "--no-progress", "run.steps=2",
              "eval.interval=2", "eval.max_problems=16", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4"]
    first = run_cli("quickstart", *common, f"run.run_dir={tmp_path / 'a'}")
    _ok(first)
    assert "warm start: SFT of" in first.stdout
    cache = tmp_path / "warm-start"
    sft_dirs = sorted(cache.glob("sft-*-seed1"))
    assert len(sft_dirs) == 1 and len(read_metrics(sft_dirs[0])) == 4
    made = json.loads((tmp_path / "a" / "warm_start.json").read_text())
    assert made["sft_checkpoint"].startswith(str(sft_dirs[0]))
    start = json.loads((tmp_path / "a" / "eval_start.json").read_text())
    assert 0.0 <= start["pass@1"] <= 1.0 and start["mean_response_tokens"] > 0
    rows = read_metrics(tmp_path / "a")
    assert len(rows) == 2 and "eval/pass@1" in rows[-1]

    # another loss on the same seed: the same warm start, not made again
    second = run_cli("quickstart", *common, f"run.run_dir={tmp_path / 'b'}", "loss.name=dapo")
    _ok(second)
    assert "warm start: SFT of" not in second.stdout
    assert json.loads((tmp_path / "b" / "warm_start.json").read_text())["sft_checkpoint"] == made["sft_checkpoint"]
    assert sorted(cache.glob("sft-*-seed1")) == sft_dirs

    # two runs of a new seed started at once (as `compare --jobs 2` starts them): one makes the warm start while
    # the other waits for it, and both start from it
    procs = [subprocess.Popen(_command(("quickstart", *common, "run.seed=2", "run.steps=1",
                                        f"run.run_dir={tmp_path / name}"), 1), cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name in ("c", "d")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("warm start: SFT of" in out for out in outs) == 1, outs
    assert len(list(cache.glob("sft-*-seed2"))) == 1
    made_c, made_d = (json.loads((tmp_path / n / "warm_start.json").read_text())["sft_checkpoint"] for n in "cd")
    assert made_c == made_d and "seed2" in made_c
    # the run's resolved config starts from the SFT checkpoint and evaluates the task's held-out questions
    import yaml

    config = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert config["checkpoint"]["load"] == made["sft_checkpoint"]
    assert config["eval"]["data"].endswith("rl-eval.jsonl") and config["reward"]["name"] == "reasoning_gym"


# The arithmetic task as shipped (configs/arithmetic.yaml, NSR): from the SFT warm start, RL raises held-out pass@1
# (the mean of the evals in the last tenth of the run against the starting weights' eval) while clipping matters.
# docs/EVIDENCE.md has the same runs over 20 seeds and the losses compared.
@pytest.mark.parametrize(("seed", "threads"), [(1, 1), (4, 2)], ids=["seed1-1thread", "seed4-2threads"])
def test_rl_raises_held_out_pass_at_1_while_clipping_matters(tmp_path: Path, seed: int, threads: int) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli("quickstart", "--task", "arithmetic", "--no-progress", f"run.run_dir={run_dir}",
                   f"run.seed={seed}", "checkpoint.save_interval=0", threads=threads)
    _ok(proc)
    rows = read_metrics(run_dir)
    steps = len(rows)
    start = json.loads((run_dir / "eval_start.json").read_text())["pass@1"]
    final = [r["eval/pass@1"] for r in rows if "eval/pass@1" in r and r["step"] > steps - steps // 10]
    assert len(final) >= 2
    rise = sum(final) / len(final) - start
    clipped = [r["clip_frac"] for r in rows]
    line = (f"held-out pass@1 {start:.3f} -> {sum(final) / len(final):.3f} ({rise:+.3f}), clipped tokens "
            f"{sum(clipped) / steps:.3f} (largest step {max(clipped):.3f})")
    assert 0.2 <= start <= 0.6, line  # the warm start is partly competent
    assert rise > RISE, line
    assert max(clipped) >= CLIPPED_MAX and sum(clipped) / steps >= CLIPPED_MEAN, line
    assert any(r["rescue_frac"] > 0 for r in rows), "NSR never rescued a token"
