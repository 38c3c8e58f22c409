"""The RL loop end to end through the real CLI: it learns, survives being killed in any phase, reports what it
could not do, and runs under torchrun and against an HTTP rollout server."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nsr_megatron.telemetry.summary import learning_summary
from tests.helpers import project_server

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None, nproc: int = 1, timeout: int = 900,
            threads: int | None = None, preexec: object = None,
            module: str = "nsr_megatron.cli") -> subprocess.CompletedProcess[str]:
    n = threads if threads is not None else _threads(nproc)
    full_env = {**os.environ, "OMP_NUM_THREADS": str(n), **(env or {})}
    cmd = _command(args, nproc, module)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)  # type: ignore[arg-type]


def _threads(nproc: int) -> int:
    """Torch threads per rank of the CLI runs: 2 for one process, 1 under torchrun (2 cores)."""
    return 1 if nproc > 1 else 2


def _command(args: tuple[str, ...], nproc: int, module: str = "nsr_megatron.cli") -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(_free_port()), "-m", module, *args]
    return [sys.executable, "-m", module, *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def _final_weights(run_dir: Path, step: int, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint (weights and Adam state), read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{run_dir.name}-{step}.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / f"step_{step:08d}"), str(out))
    state = torch.load(out, weights_only=False)  # a file this test just wrote (holds byte-stream extra state)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _assert_same_run(a_dir: Path, b_dir: Path, step: int, tmp: Path) -> None:
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, step + 1))
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if not key.startswith("timing/"):
                assert rb[key] == value, f"step {ra['step']} {key}: straight {value} vs resumed {rb[key]}"
    wa, wb = _final_weights(a_dir, step, tmp), _final_weights(b_dir, step, tmp)
    assert sorted(wa) == sorted(wb) and any(k.startswith("optimizer.") for k in wa)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"final weight {name} differs after resume"


# ------------------------------------------------------------------------------------------------ learning

# The shipped config on a few seeds and both thread counts (bench/bench_quickstart_seeds.py runs all ten).
@pytest.mark.parametrize(("seed", "threads"), [(None, 2), (None, 1), (4, 2), (7, 1)],
                         ids=["shipped-2threads", "shipped-1thread", "seed4-2threads", "seed7-1thread"])
def test_quickstart_learns(tmp_path: Path, seed: int | None, threads: int) -> None:
    run_dir = tmp_path / "qs"
    extra = [] if seed is None else [f"run.seed={seed}"]
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", *extra, threads=threads)
    _ok(proc)
    rows = read_metrics(run_dir)
    summary = learning_summary([r["reward/mean"] for r in rows])
    assert summary.learned, summary.line()
    assert f"train: {len(rows)} steps in {run_dir}; learned: mean reward" in proc.stdout
    if seed is not None:
        return
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for key in ("reward/mean", "response_length/mean", "loss", "clip_frac/upper", "clip_frac/lower",
                "rescue_frac", "entropy", "grad_norm", "timing/rollout", "timing/rewards", "timing/logprobs",
                "timing/train", "timing/weight_sync", "rollout/empty_steps", "train/skipped_steps"):
        assert key in rows[0], f"metrics.jsonl lacks {key}"
    assert any(r["loss"] != 0.0 for r in rows) and any(r["clip_frac"] > 0 for r in rows)
    assert any(r["rescue_frac"] > 0 for r in rows), "NSR never rescued a token"
    for name in ("reward", "response_length", "entropy", "clip_rescue"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "tb").iterdir())
    assert (run_dir / "checkpoints" / f"step_{len(rows):08d}" / "nsr_meta.json").is_file()
    assert json.loads((run_dir / "status.json").read_text())["phase"] == "done"


# ------------------------------------------------------------------------------------------------ faults

# Slow rewards (10 ms a call) give every phase time to be caught; the straight run uses the same config. A
# constant learning rate keeps the schedule independent of run.steps, so a run may stop early and be extended.
FAULT = ["--no-progress", "run.steps=4", "checkpoint.save_interval=2", "rollout.prompts_per_step=8",
         "rollout.samples_per_prompt=4", "reward.name=tests.e2e.bad_rewards:slow_synthetic",
         "optimizer.lr_schedule=constant", "optimizer.min_lr=0"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    _ok(run_cli("quickstart", f"run.run_dir={run_dir}", *FAULT))
    return run_dir


def _kill_in_phase(run_dir: Path, step: int, phase: str) -> dict[str, object]:
    """Start the quickstart, SIGKILL its whole process group (as a scheduler would) as soon as step ``step``
    enters ``phase``; return the status the run had written when it died."""
    proc = subprocess.Popen(_command(("quickstart", f"run.run_dir={run_dir}", *FAULT), 1), cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "2"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    tmp_ckpt = run_dir / "checkpoints" / f".tmp-step_{step:08d}"
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            status = _status(run_dir)
            if status and status["step"] == step and status["phase"] == phase and (
                    phase != "checkpoint" or tmp_ckpt.exists()):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (exit {proc.returncode})"
    return _status(run_dir) or {}


def _status(run_dir: Path) -> dict[str, object] | None:
    try:
        return dict(json.loads((run_dir / "status.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.parametrize(("phase", "step"), [("rollout", 3), ("rewards", 3), ("train", 3), ("weight_sync", 3),
                                             ("checkpoint", 4)])
def test_a_run_killed_in_any_phase_resumes_exactly(tmp_path: Path, straight_run: Path, phase: str,
                                                   step: int) -> None:
    for _attempt in range(3):  # a phase of a few ms can end before the kill lands: try again (rare)
        run_dir = tmp_path / f"killed-{_attempt}"
        status = _kill_in_phase(run_dir, step, phase)
        if status.get("phase") == phase and status.get("step") == step:
            break
    else:
        pytest.fail(f"could not kill the run inside phase {phase} of step {step} (last status {status})")
    checkpoints = run_dir / "checkpoints"
    if phase == "checkpoint":  # killed after the temporary folder appeared, before the rename
        assert (checkpoints / ".tmp-step_00000004").exists() and not (checkpoints / "step_00000004").exists()
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")) == ["step_00000002"]
    _ok(run_cli("quickstart", f"run.run_dir={run_dir}", *FAULT))  # the same command again
    _assert_same_run(straight_run, run_dir, 4, tmp_path)
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())


def test_a_failed_checkpoint_write_is_reported_and_nothing_half_written_is_used(tmp_path: Path,
                                                                                straight_run: Path) -> None:
    import resource

    run_dir = tmp_path / "run"
    _ok(run_cli("quickstart", f"run.run_dir={run_dir}", *FAULT, "run.steps=2"))
    size_of_step2 = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step_00000002").rglob("*"))

    def small_file_limit() -> None:  # files may not grow past 64 KiB: the checkpoint shards cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = run_cli("quickstart", f"run.run_dir={run_dir}", *FAULT, preexec=small_file_limit)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nsr-megatron: checkpoint error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"could not write checkpoint step_00000004 into {run_dir / 'checkpoints'}" in errors[0]
    assert "The previous checkpoint step_00000002 is intact" in errors[0]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_00000002"], names  # nothing half-written is left to be picked up
    assert sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step_00000002").rglob("*")) == size_of_step2
    _ok(run_cli("quickstart", f"run.run_dir={run_dir}", *FAULT))  # with room again, it resumes from step 2
    _assert_same_run(straight_run, run_dir, 4, tmp_path)


def test_resume_under_another_layout_reshards(tmp_path: Path) -> None:
    """Saved by one process, resumed under torchrun with EP=2: step 3 samples exactly what a straight
    single-process run samples (the engine gets the loaded weights), and trains to the same weights and Adam
    state up to rounding."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--no-progress", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=8",
              "checkpoint.save_interval=2", "optimizer.lr_schedule=constant", "optimizer.min_lr=0"]
    _ok(run_cli("quickstart", f"run.run_dir={straight}", *common, "run.steps=3"))
    _ok(run_cli("quickstart", f"run.run_dir={resumed}", *common, "run.steps=2"))
    proc = run_cli("quickstart", f"run.run_dir={resumed}", *common, "run.steps=3", "parallel.ep=2", nproc=2)
    _ok(proc)
    assert "resumed from" in proc.stderr
    a, b = read_metrics(straight), read_metrics(resumed)
    untimed = [[{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows[:2]] for rows in (a, b)]
    assert [r["step"] for r in b] == [1, 2, 3] and untimed[0] == untimed[1]
    assert b[2]["reward/mean"] == a[2]["reward/mean"] and b[2]["grad_norm"] > 0
    for key in ("loss", "grad_norm", "entropy", "clip_frac"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-4, abs=1e-6), key
    meta = json.loads((resumed / "checkpoints" / "step_00000003" / "nsr_meta.json").read_text())
    assert meta["layout"]["ep"] == 2 and meta["has_optimizer"]
    wa, wb = _final_weights(straight, 3, tmp_path), _final_weights(resumed, 3, tmp_path)
    assert sorted(wa) == sorted(wb) and any(k.startswith("optimizer.") for k in wa)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.ep=2"],
                                    ["parallel.pp=2"]], ids=["tp2", "ep2", "pp2"])
def test_torchrun_layouts_match_single_process(tmp_path: Path, layout: list[str]) -> None:
    """Each layout trains like one process, and the project's server it pushes to (over a gloo weight group:
    rollout.weight_sync=distributed, not auto's shared memory) then holds exactly ``mcore-to-hf`` of the checkpoint
    the run saved, bitwise."""
    from nsr_megatron.convert import mcore_to_hf
    from nsr_megatron.rollout import HttpEngine
    from tests.e2e.test_engine_pool import checksum, hf_tensors

    common = ["--no-progress", "run.steps=2", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    _ok(run_cli("quickstart", f"run.run_dir={single}", *common))
    with project_server(single / "hf-init", port=_free_port()) as url:
        _ok(run_cli("quickstart", f"run.run_dir={multi}", *common, *layout, "rollout.backend=server",
                    "rollout.weight_sync=distributed", f"rollout.urls=[{url}]", f"model.hf_path={single / 'hf-init'}",
                    f"data.path={single / 'data' / 'echo.jsonl'}", nproc=2))
        engine = HttpEngine(url)
        assert engine.weight_version() == "2"
        converted = mcore_to_hf(multi / "checkpoints" / "step_00000002", tmp_path / "converted", progress=False)
        want = {name: checksum(t) for name, t in hf_tensors(converted)}
        got = engine.weights_checksums()
        assert {n: got[n] for n in want} == want
    a, b = read_metrics(single), read_metrics(multi)
    assert len(a) == len(b) == 2
    # Step 1 starts from identical weights and draws identical samples: everything matches to rounding.
    assert b[0]["reward/mean"] == a[0]["reward/mean"]
    for key in ("loss", "entropy", "clip_frac/upper", "clip_frac/lower", "rescue_frac", "grad_norm"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-4, abs=1e-5), key
    # Step 2 samples from weights that differ by rounding only; sampling may differ in rare draws.
    assert b[1]["reward/mean"] == pytest.approx(a[1]["reward/mean"], abs=0.1)


def test_pipeline_parallel_with_a_short_last_micro_batch_matches_one_process(tmp_path: Path) -> None:
    """PP2 with micro-batches of 5 rows (40 tokens of 8): a mini-batch of 64 samples ends in a micro-batch of 4,
    which gets a row of padding (the schedule sends one activation shape) and trains like one process."""
    common = ["--no-progress", "run.steps=1", "algorithm.max_tokens_per_micro_batch=40"]
    single, multi = tmp_path / "single", tmp_path / "pp2"
    _ok(run_cli("quickstart", f"run.run_dir={single}", *common))
    _ok(run_cli("quickstart", f"run.run_dir={multi}", *common, "parallel.pp=2", f"model.hf_path={single / 'hf-init'}",
                f"data.path={single / 'data' / 'echo.jsonl'}", nproc=2))
    a, b = read_metrics(single)[0], read_metrics(multi)[0]
    assert b["reward/mean"] == a["reward/mean"]
    for key in ("loss", "entropy", "clip_frac/upper", "clip_frac/lower", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


# ------------------------------------------------------------------------------------------------ rewards, options

def test_bad_inputs_fail_clearly(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1=", "answer": "1"}\n{"prompt": "2=", "answer": \n', encoding="utf-8")
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={tmp_path / 'r1'}", f"data.path={data}", "run.steps=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{data}, line 2" in proc.stderr

    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={tmp_path / 'r2'}", "parallel.tp=3")
    assert proc.returncode == 2
    assert "parallel.tp=3 does not divide num_attention_heads=4" in proc.stderr
    assert not (tmp_path / "r2" / "checkpoints").exists()


def test_failing_rewards_score_zero_and_are_counted(tmp_path: Path) -> None:
    run_dir = tmp_path / "rw"
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "run.steps=2",
                   "reward.name=tests.e2e.bad_rewards:flaky", "reward.timeout_s=0.5", "reward.executor=process",
                   "rollout.prompts_per_step=16", "rollout.samples_per_prompt=2")
    _ok(proc)
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    for key in ("reward/errors", "reward/timeouts", "reward/invalid"):
        assert sum(r[key] for r in rows) > 0, key
    # the first invalid value the run meets (which prompt comes first depends on run.seed's prompt order)
    assert re.search(r"returned (nan, not a finite number|NoneType None|str '1\.0', not a number)", proc.stderr)


def test_dynamic_sampling_drops_groups_and_tis_mis_kl_see_recomputed_logprobs(tmp_path: Path) -> None:
    run_dir = tmp_path / "opts"
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "run.steps=3", "loss.name=grpo",
                   "loss.kl_coef=0.01", "loss.tis_cap=2.0", "loss.mis_low=0.5", "loss.mis_high=2.0",
                   "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=3",
                   "optimizer.warmup_steps=4", "optimizer.lr_schedule=cosine",
                   "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4")
    _ok(proc)
    rows = read_metrics(run_dir)
    assert len(rows) == 3
    # Groups whose rewards were all equal were dropped (and more prompts sampled); none reached the loss.
    assert sum(r["rollout/dropped_groups"] for r in rows) > 0
    assert any(r["rollout/rounds"] > 1 for r in rows)
    for r in rows:
        assert r["rollout/uniform_groups"] == 0 and 1 <= r["rollout/kept_groups"] <= 8
        # The trainer recomputes the old log-probs; the engine's agree with them to rounding, so the TIS
        # weights are ~1 and MIS masks nothing. A misaligned or wrong log-prob would move both.
        assert r["tis/weight_mean"] == pytest.approx(1.0, abs=1e-4) and r["mis/masked_frac"] == 0.0
        assert r["kl_ref"] > 0  # the second mini-batch trains on a policy that moved away from the reference
    assert rows[0]["lr"] == pytest.approx(0.5 * rows[1]["lr"])  # linear warm-up over 4 optimizer steps


def test_the_on_policy_shortcut_changes_no_number(tmp_path: Path) -> None:
    """One optimizer step per rollout batch: the old log-probs taken from the training forward (the default, no
    extra forward) give the same samples, metrics, weights and Adam state as the separate old-log-prob forward."""
    common = ["--no-progress", "run.steps=3", "checkpoint.save_interval=3", "algorithm.mini_batches=1",
              "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4"]
    runs = {flag: tmp_path / f"shortcut-{flag}" for flag in ("true", "false")}
    for flag, run_dir in runs.items():
        _ok(run_cli("quickstart", *common, f"run.run_dir={run_dir}", f"algorithm.on_policy_shortcut={flag}"))
    short, full = read_metrics(runs["true"]), read_metrics(runs["false"])
    assert len(short) == len(full) == 3
    for a, b in zip(short, full, strict=True):
        assert a["reward/mean"] == b["reward/mean"] and a["tokens"] == b["tokens"]  # the same samples
        for key, value in b.items():
            if not key.startswith("timing/") and isinstance(value, float):
                assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"step {b['step']} {key}"
    assert all(r["kl_old"] == 0.0 for r in full)  # the old forward agrees with the training forward exactly
    wa, wb = _final_weights(runs["true"], 3, tmp_path), _final_weights(runs["false"], 3, tmp_path)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_overlap_samples_each_step_from_the_weights_before_and_resumes_on_the_same_data(tmp_path: Path) -> None:
    """rollout.overlap: the next step's samples are drawn while a step trains. With a policy that cannot move
    (lr 1e-30 leaves every fp32 weight as it is) staleness changes nothing, so every metric equals the sequential
    run's: the same prompts, draws and advantages, step by step. A run resumed from a checkpoint taken while a
    prefetch was pending samples the same prompts again (on-policy for that step) and ends identical too."""
    import shutil

    frozen = ["--no-progress", "run.steps=4", "checkpoint.save_interval=2", "optimizer.lr=1e-30",
              "optimizer.min_lr=1e-30", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4"]
    runs = {name: tmp_path / name for name in ("sequential", "overlap", "resumed")}
    _ok(run_cli("quickstart", *frozen, f"run.run_dir={runs['sequential']}"))
    _ok(run_cli("quickstart", *frozen, f"run.run_dir={runs['overlap']}", "rollout.overlap=true"))
    shutil.copytree(runs["overlap"], runs["resumed"])
    shutil.rmtree(runs["resumed"] / "checkpoints" / "step_00000004")  # the newest left is step 2's (prefetch pending)
    _ok(run_cli("quickstart", *frozen, f"run.run_dir={runs['resumed']}", "rollout.overlap=true"))
    seq, ovl, res = (read_metrics(runs[n]) for n in ("sequential", "overlap", "resumed"))
    assert [r["rollout/staleness"] for r in ovl] == [0.0, 1.0, 1.0, 1.0]
    assert [r["rollout/staleness"] for r in res] == [0.0, 1.0, 0.0, 1.0]  # step 3 sampled again after the resume
    for a, b, c in zip(seq, ovl, res, strict=True):
        for key, value in a.items():
            if not key.startswith("timing/"):
                assert b[key] == value and c[key] == value, f"step {a['step']} {key}: {value} {b[key]} {c[key]}"
    assert all(r["timing/rollout_background"] > 0 for r in ovl[1:])


def test_overlap_learns_with_tis(tmp_path: Path) -> None:
    run_dir = tmp_path / "overlap"
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "rollout.overlap=true", "loss.tis_cap=2.0",
                   "checkpoint.save_interval=0", threads=1)
    _ok(proc)
    rows = read_metrics(run_dir)
    summary = learning_summary([r["reward/mean"] for r in rows])
    assert summary.learned, summary.line()
    assert all(r["rollout/staleness"] == 1.0 for r in rows[1:]) and "tis/weight_mean" in rows[-1]


def test_empty_steps_are_steps(tmp_path: Path) -> None:
    """DAPO on a task where every reward is 0: dynamic sampling keeps no group, every step trains nothing. The
    run says so, counts it, saves checkpoints without optimizer state, and resumes from them."""
    run_dir = tmp_path / "empty"
    common = ["--no-progress", f"run.run_dir={run_dir}", "reward.name=math", "algorithm.dynamic_sampling=true",
              "algorithm.max_sampling_rounds=2", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
              "run.warn_no_signal_steps=2", "checkpoint.save_interval=1"]
    proc = run_cli("quickstart", *common, "run.steps=2")
    _ok(proc)
    assert "step 1 trained nothing: dynamic sampling kept no group in 2 rounds" in proc.stderr
    assert "no learning signal for 2 steps in a row (steps 1-2)" in proc.stderr
    assert "reward.name='math'" in proc.stderr and "data.answer_key='answer'" in proc.stderr
    rows = read_metrics(run_dir)
    assert [r["rollout/empty_steps"] for r in rows] == [1.0, 2.0]
    assert all(r["loss"] is None and r["rollout/kept_groups"] == 0 for r in rows)
    meta = json.loads((run_dir / "checkpoints" / "step_00000002" / "nsr_meta.json").read_text())
    assert meta["has_optimizer"] is False and meta["meta"]["counters"]["rollout/empty_steps"] == 2
    proc = run_cli("quickstart", *common, "run.steps=3")
    _ok(proc)
    assert [r["rollout/empty_steps"] for r in read_metrics(run_dir)] == [1.0, 2.0, 3.0]


# ------------------------------------------------------------------------------------------------ engines, models

def test_server_backend_attached_by_url_samples_like_the_embedded_engine(tmp_path: Path) -> None:
    common = ["--no-progress", "run.steps=5", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4"]
    embedded = tmp_path / "embedded"
    _ok(run_cli("quickstart", f"run.run_dir={embedded}", *common))
    http = tmp_path / "http"
    with project_server(embedded / "hf-init", port=_free_port()) as url:
        _ok(run_cli("quickstart", f"run.run_dir={http}", *common, "rollout.backend=server", f"rollout.urls=[{url}]",
                    f"model.hf_path={embedded / 'hf-init'}", f"data.path={embedded / 'data' / 'echo.jsonl'}"))
    a, b = read_metrics(embedded), read_metrics(http)
    # The server samples with the same per-prompt seeds from the weights the trainer pushed to it.
    assert [r["reward/mean"] for r in a] == [r["reward/mean"] for r in b]
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-5)


@pytest.fixture(scope="module")
def embedded_step1(tmp_path_factory: pytest.TempPathFactory) -> float:
    run_dir = tmp_path_factory.mktemp("embedded1") / "run"
    _ok(run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "run.steps=1"))
    return float(read_metrics(run_dir)[0]["reward/mean"])


@pytest.mark.parametrize("layout", [
    ["parallel.tp=2", "parallel.sequence_parallel=true", "rollout.weight_sync=distributed"],
    ["parallel.ep=2", "rollout.weight_sync=shared_memory"]],
                         ids=["tp2-distributed", "ep2-shared-memory"])
def test_two_server_engines_under_torchrun_learn(tmp_path: Path, embedded_step1: float, layout: list[str]) -> None:
    """The shipped quickstart with rollout.backend=server and two engines the trainer launches, under torchrun.
    Under EP=2 the weights reach the engines through shared memory (each rank writes its own experts), and one
    engine is SIGKILLed in step 3: it is restarted, resynced from disk (both ranks export), and mapped anew."""
    run_dir = tmp_path / "run"
    args = ["--no-progress", "rollout.backend=server", "rollout.num_engines=2", *layout]
    shared = "rollout.weight_sync=shared_memory" in layout
    if shared:
        assert "restarting it" in _run_killing_an_engine(run_dir, args, step=3, phase="rollout", nproc=2)
    else:
        _ok(run_cli("quickstart", f"run.run_dir={run_dir}", *args, nproc=2))
    rows = read_metrics(run_dir)
    summary = learning_summary([r["reward/mean"] for r in rows])
    assert summary.learned, summary.line()
    assert rows[0]["reward/mean"] == embedded_step1  # same weights, same per-prompt seeds, another engine
    assert sum(r["rollout/restarts"] for r in rows) == (1 if shared else 0)
    assert sorted(p.name for p in (run_dir / "engines").iterdir()) == ["engine0.log", "engine1.log"]


def _engine_pids(hf_dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"nsr_megatron.rollout.server --model-path {hf_dir} "], capture_output=True,
                         text=True)
    return [int(p) for p in out.stdout.split()]


def _run_killing_an_engine(run_dir: Path, args: list[str], *, step: int, phase: str, nproc: int = 1) -> str:
    """Run the quickstart with ``args`` on ``nproc`` ranks and SIGKILL its first engine process once
    ``status.json`` shows ``phase`` of ``step``; returns the run's stderr (the run must succeed and the kill must
    have happened)."""
    proc = subprocess.Popen(_command(("quickstart", f"run.run_dir={run_dir}", *args), nproc), cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": str(_threads(nproc))}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # run_cli's threads: the same rounding
    victim = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and victim is None:
        status = _status(run_dir)
        if status and status["step"] == step and status["phase"] == phase:
            pids = _engine_pids(run_dir / "hf-init")
            if pids:
                victim = pids[0]
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.001)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert victim is not None, f"the run never reached the {phase} of step {step}"
    return err


def test_an_engine_killed_mid_rollout_is_restarted_and_the_run_is_unchanged(tmp_path: Path) -> None:
    common = ["--no-progress", "run.steps=4", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
              "rollout.backend=server", "rollout.num_engines=2", "rollout.max_new_tokens=16",
              "reward.name=tests.e2e.bad_rewards:slow_synthetic"]
    calm, killed = tmp_path / "calm", tmp_path / "killed"
    _ok(run_cli("quickstart", f"run.run_dir={calm}", *common))
    err = _run_killing_an_engine(killed, common, step=3, phase="rollout")
    a, b = read_metrics(calm), read_metrics(killed)
    assert sum(r["rollout/restarts"] for r in b) == 1 and all(r["rollout/restarts"] == 0 for r in a)
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if not key.startswith("timing/") and key != "rollout/restarts":
                assert rb[key] == value, f"step {ra['step']} {key}: {value} vs {rb[key]} after the engine's restart"
    assert "restarting it" in err


def test_an_engine_killed_under_a_background_rollout_is_restarted(tmp_path: Path) -> None:
    """rollout.overlap with two server engines: one is killed while step 3 trains and step 4 samples in the
    background. The run finishes with the engine restarted and counted; a step whose background rollout met the
    dead engine samples in the foreground (staleness 0) after the engine got the current weights."""
    run_dir = tmp_path / "overlap-kill"
    args = ["--no-progress", "run.steps=5", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
            "rollout.backend=server", "rollout.num_engines=2", "rollout.max_new_tokens=16",
            "reward.name=tests.e2e.bad_rewards:slow_synthetic", "rollout.overlap=true"]
    err = _run_killing_an_engine(run_dir, args, step=3, phase="train")
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and sum(r["rollout/restarts"] for r in rows) >= 1
    assert "restarting it" in err
    for stopped in re.findall(r"step (\d+): the background rollout stopped", err):  # sampled in the foreground
        assert rows[int(stopped) - 1]["rollout/staleness"] == 0.0


def test_dense_tied_qwen2_trains(tmp_path: Path) -> None:
    run_dir = tmp_path / "qwen2"
    _ok(run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "run.steps=2", "model.tiny.model_type=qwen2",
                "model.tiny.architectures=[Qwen2ForCausalLM]", "model.tiny.tie_word_embeddings=true",
                "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4"))
    rows = read_metrics(run_dir)
    assert len(rows) == 2 and rows[0]["grad_norm"] > 0


def test_auto_weight_sync_falls_back_to_the_distributed_path(tmp_path: Path) -> None:
    """rollout.weight_sync=auto (the default) with a server engine on this host syncs through shared memory; when
    the engine's memory cannot be mapped (``tests/e2e/unmappable.py`` makes mapping fail as it does across PID
    namespaces) the run warns, switches to the distributed path and samples exactly as a run that used it from
    the start."""
    common = ["--no-progress", "run.steps=3", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
              "rollout.backend=server"]
    auto, fallback, distributed = tmp_path / "auto", tmp_path / "fallback", tmp_path / "distributed"
    proc = run_cli("quickstart", f"run.run_dir={auto}", *common)
    _ok(proc)
    assert "weights reach the engines by shared_memory (rollout.weight_sync=auto)" in proc.stderr
    proc = run_cli("quickstart", f"run.run_dir={fallback}", *common, module="tests.e2e.unmappable")
    _ok(proc)
    assert "weights go over the distributed path from now on" in proc.stderr and "(simulated)" in proc.stderr
    _ok(run_cli("quickstart", f"run.run_dir={distributed}", *common, "rollout.weight_sync=distributed"))
    want = read_metrics(distributed)
    for run_dir in (auto, fallback):
        rows = read_metrics(run_dir)
        assert [r["reward/mean"] for r in rows] == [r["reward/mean"] for r in want]
        assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in want], rel=1e-6)
