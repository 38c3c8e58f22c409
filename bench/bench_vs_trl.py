"""One RL step of nsr-megatron against TRL's ``GRPOTrainer`` on the same CPU, in alternating runs.

Both sides train the same tiny random Qwen3-MoE (hidden 256, 4 layers, 8 experts top-2, about 7.1M parameters,
fp32), from the very same Hugging Face checkpoint, on the synthetic ``echo`` task (prompt ``7=``, answer ``7``,
rendered by the synthetic tokenizer's chat template as ``<bos>7=``) with the ``synthetic`` reward: 16 prompts x 8
samples per step, at most 8 new tokens, temperature 1.0, one optimizer step per rollout batch, the DAPO loss
(eps 0.2 / 0.28, token-mean, no KL), Adam lr 2e-3 constant, gradient clipping 1.0, no MoE load-balancing loss,
no activation recomputation (TRL's default gradient checkpointing is turned off).

* nsr-megatron runs the quickstart loop (``train(config)`` as ``bench/bench_rl_step.py`` does) in a fresh process
  per run, as TRL does (this file in ``--ours-worker`` mode, under the project's python); its per-phase split
  comes from ``metrics.jsonl`` (``timing/*``).
* TRL runs in its own virtual environment (``.venv-trl``, made by ``scripts/setup_trl.sh``; TRL is never a
  requirement of nsr-megatron) as a subprocess: this file in ``--trl-worker`` mode. A ``TrainerCallback`` times
  each optimizer step (``on_step_begin`` -> ``on_step_end``); ``model.generate`` and the reward function are
  timed by wrapping them.

The runs alternate (TRL, ours, TRL, ours, ...), each of ``--steps`` steps; the first step of every run is a
warm-up and is dropped. Each run reports its median step time and the mean reward of its first and last step
(a sanity check that both sides learn); the summary is the median over runs of each side's median step time,
the per-phase split of both sides and the ratio ours / TRL. Both sides use ``torch.set_num_threads(--threads)``.

Measure on an otherwise idle machine (the script warns when the load average says it is not): with other
processes on the cores, every multi-threaded op waits for its descheduled threads, which swamps the comparison
(on a 2-core machine at load 5, one forward of the Hugging Face model went from 0.13 s at 1 thread to 2.7 s at 2,
and TRL's step from 0.6 s to 20 s, while ours barely moved).

Usage:
    bash scripts/setup_trl.sh && .venv/bin/python bench/bench_vs_trl.py
    .venv/bin/python bench/bench_vs_trl.py --steps 12 --rounds 2 --threads 2
    .venv/bin/python bench/bench_vs_trl.py --steps 4 --rounds 1        # a quick check that both sides run
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"

TASK = "echo"
NUM_RECORDS = 1024  # prompts in the data set (the quickstart's default)
PROMPTS_PER_STEP = 16
SAMPLES_PER_PROMPT = 8
MAX_NEW_TOKENS = 8
TEMPERATURE = 1.0
LR = 2e-3
EPS_LOW, EPS_HIGH = 0.2, 0.28
CLIP_GRAD = 1.0

# The quickstart's `model.tiny` scaled up: hidden 256, 4 layers, 8 experts top-2 -> about 7.1M parameters.
TINY_MODEL: dict[str, Any] = {
    "vocab_size": 32, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
    "num_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 64,
}

OUR_PHASES = ("rollout", "rewards", "logprobs", "train", "weight_sync")
TRL_PHASES = ("generate", "reward_fn")


@dataclass
class RunResult:
    """One run of one side: per-step seconds (all steps, the first included), phases and rewards."""

    side: str
    steps: list[float]
    phases: dict[str, list[float]]
    rewards: list[float]
    wall: float
    threads: int
    extra: dict[str, Any] = field(default_factory=dict)
    load: float = field(default_factory=lambda: os.getloadavg()[0])  # at the end of the run

    def median_step(self) -> float:
        return statistics.median(self.steps[1:])

    def median_phases(self) -> dict[str, float]:
        return {name: statistics.median(values[1:]) for name, values in self.phases.items()}


# --------------------------------------------------------------------------------------------------------------
# TRL's side (runs under .venv-trl/bin/python; only the standard library and TRL's stack are imported here).
# --------------------------------------------------------------------------------------------------------------


def trl_worker(hf_dir: Path, data: Path, steps: int, threads: int, seed: int, out: Path) -> None:
    """Train ``steps`` GRPO steps with TRL and write the per-step timings and rewards as JSON to ``out``."""
    sys.path.insert(0, str(ROOT))  # nsr_megatron's reward (pure Python: no megatron import)
    import torch

    torch.set_num_threads(threads)

    import accelerate
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from nsr_megatron.rewards.builtin import synthetic_reward

    timer: dict[str, float] = dict.fromkeys(TRL_PHASES, 0.0)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # keeps the name: TRL logs each reward function under its __name__
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer[name] += time.perf_counter() - began

        return wrapper

    def echo_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        """TRL reward function: ``synthetic_reward`` of each completion (text, or the assistant message)."""
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [synthetic_reward(text, ans) for text, ans in zip(texts, answer, strict=True)]

    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    # Conversational prompts: TRL applies the tokenizer's chat template (<bos> + content), as nsr-megatron does.
    dataset = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in records])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    num_params = sum(p.numel() for p in model.parameters())
    model.generate = timed("generate", model.generate)  # the instance attribute shadows the method

    result: dict[str, Any] = {"steps": [], "generate": [], "reward_fn": [], "rewards": {}, "threads": [],
                              "num_params": num_params}

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, and the reward TRL logs for it."""

        def __init__(self) -> None:
            self.began = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for name in timer:
                timer[name] = 0.0
            self.began = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            result["steps"].append(time.perf_counter() - self.began)
            for name, seconds in timer.items():
                result[name].append(seconds)
            result["threads"].append(torch.get_num_threads())

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs and "reward" in logs:
                result["rewards"][state.global_step] = float(logs["reward"])

    with tempfile.TemporaryDirectory() as output_dir:
        config = trl.GRPOConfig(
            output_dir=output_dir,
            max_steps=steps,
            # One optimizer step sees 16 prompts x 8 generations = 128 completions, generated in one batch and
            # trained on once: steps_per_generation = num_iterations = gradient_accumulation_steps = 1.
            per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES_PER_PROMPT,
            num_generations=SAMPLES_PER_PROMPT,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_iterations=1,
            max_completion_length=MAX_NEW_TOKENS,
            temperature=TEMPERATURE,
            top_p=1.0,
            top_k=0,
            loss_type="dapo",
            epsilon=EPS_LOW,
            epsilon_high=EPS_HIGH,
            beta=0.0,
            scale_rewards="group",  # nsr-megatron's algorithm.normalize_std=true
            router_aux_loss_coef=0.0,  # nsr-megatron's model.moe_aux_loss_coeff=0 (TRL's default: the config's)
            gradient_checkpointing=False,  # nsr-megatron's model.recompute="" (TRL's default: on)
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            max_grad_norm=CLIP_GRAD,
            use_cpu=True,
            use_vllm=False,
            bf16=False,
            fp16=False,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            seed=seed,
        )
        trainer = trl.GRPOTrainer(model=model, reward_funcs=timed("reward_fn", echo_reward), args=config,
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.train()

    rewards = result.pop("rewards")
    result["rewards"] = [rewards.get(step, float("nan")) for step in range(1, len(result["steps"]) + 1)]
    result["versions"] = {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                          "accelerate": accelerate.__version__, "datasets": datasets.__version__}
    result["implementation"] = (f"optim {getattr(config.optim, 'value', config.optim)}, attention {model.config._attn_implementation}, "
                                f"experts {model.config._experts_implementation}")
    out.write_text(json.dumps(result), encoding="utf-8")


def run_worker(who: str, cmd: list[str], threads: int, out: Path, log: Path, **env: str) -> tuple[Any, float]:
    """Run a worker command (this file in a worker mode) with ``threads`` torch threads and ``env``; its output
    goes to ``log``. Returns (the JSON it wrote to ``out``, wall seconds)."""
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **env}
    began = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - began
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise SystemExit(f"{who} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return json.loads(out.read_text(encoding="utf-8")), wall


def run_trl(python: Path, hf_dir: Path, data: Path, work: Path, steps: int, threads: int, seed: int) -> RunResult:
    """One TRL run in a subprocess of ``python`` (the TRL venv); its output goes to ``work/trl.log``."""
    out, log = work / "trl-result.json", work / "trl.log"
    cmd = [str(python), str(Path(__file__).resolve()), "--trl-worker", "--hf-dir", str(hf_dir), "--data", str(data),
           "--steps", str(steps), "--threads", str(threads), "--seed", str(seed), "--worker-out", str(out)]
    r, wall = run_worker("the TRL worker", cmd, threads, out, log, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return RunResult("TRL", r["steps"], {name: r[name] for name in TRL_PHASES}, r["rewards"], wall,
                     min(r["threads"]), {k: r[k] for k in ("versions", "num_params", "implementation")})


# --------------------------------------------------------------------------------------------------------------
# nsr-megatron's side (under the project's venv; one process per run).
# --------------------------------------------------------------------------------------------------------------


def run_ours(hf_dir: Path, data: Path, run_dir: Path, steps: int, threads: int, seed: int) -> RunResult:
    """One in-process run of the quickstart loop on the shared checkpoint and data."""
    import torch

    from nsr_megatron import parallel
    from nsr_megatron.cli import CONFIGS_DIR, prepare_quickstart
    from nsr_megatron.config import Config, load_config
    from nsr_megatron.trainer.loop import train

    torch.set_num_threads(threads)
    overrides = [
        f"run.run_dir={run_dir}", f"run.steps={steps}", f"run.seed={seed}", "checkpoint.save_interval=0",
        f"model.hf_path={hf_dir}", f"data.path={data}",
        f"rollout.prompts_per_step={PROMPTS_PER_STEP}", f"rollout.samples_per_prompt={SAMPLES_PER_PROMPT}",
        f"rollout.max_new_tokens={MAX_NEW_TOKENS}", f"rollout.temperature={TEMPERATURE}",
        "loss.name=dapo", f"loss.eps_low={EPS_LOW}", f"loss.eps_high={EPS_HIGH}",
        "algorithm.mini_batches=1", "algorithm.normalize_std=true",
        f"optimizer.lr={LR}", "optimizer.lr_schedule=constant", "optimizer.min_lr=0", f"optimizer.clip_grad={CLIP_GRAD}",
        "model.params_dtype=fp32",
    ]
    began = time.perf_counter()
    config: Config = load_config(CONFIGS_DIR / "quickstart.yaml", overrides, Config)
    config = prepare_quickstart(config, task=TASK, num_prompts=NUM_RECORDS)
    try:
        train(config, progress=False)
    finally:
        parallel.destroy()
    wall = time.perf_counter() - began
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    phases = {name: [float(r.get(f"timing/{name}", 0.0)) for r in rows] for name in OUR_PHASES}
    return RunResult("ours", [float(r["timing/step"]) for r in rows], phases,
                     [float(r["reward/mean"]) for r in rows], wall, torch.get_num_threads())


def ours_worker(hf_dir: Path, data: Path, run_dir: Path, steps: int, threads: int, seed: int, out: Path) -> None:
    """``--ours-worker`` mode: one run of ours in this fresh process, its result as JSON in ``out``."""
    r = run_ours(hf_dir, data, run_dir, steps, threads, seed)
    out.write_text(json.dumps({"steps": r.steps, "phases": r.phases, "rewards": r.rewards, "threads": r.threads}),
                   encoding="utf-8")


def run_ours_fresh(hf_dir: Path, data: Path, run_dir: Path, steps: int, threads: int, seed: int) -> RunResult:
    """One run of ours in a fresh process, as TRL's runs are: in one process, the second and later runs of the
    loop at two threads were slower than the first (not at one thread; ``--in-process`` shows it), which would
    bias the comparison.
    Its output goes to ``run_dir.log``."""
    out, log = run_dir.with_suffix(".json"), run_dir.with_suffix(".log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ours-worker", "--hf-dir", str(hf_dir), "--data",
           str(data), "--run-dir", str(run_dir), "--steps", str(steps), "--threads", str(threads), "--seed", str(seed),
           "--worker-out", str(out)]
    r, wall = run_worker("our worker", cmd, threads, out, log)
    return RunResult("ours", r["steps"], r["phases"], r["rewards"], wall, r["threads"])


# --------------------------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------------------------


def count_parameters(hf_dir: Path) -> int:
    """Parameters of the checkpoint, from its safetensors headers."""
    from safetensors import safe_open

    total = 0
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def run_line(index: int, r: RunResult) -> str:
    first, last = r.rewards[0], r.rewards[-1]
    return (f"  run {index} {r.side:<4}: median step {r.median_step() * 1e3:7.1f} ms over steps 2-{len(r.steps)} | "
            f"reward step 1 {first:.3f} -> step {len(r.rewards)} {last:.3f} | {r.threads} threads | "
            f"run wall {r.wall:.1f} s | load average {r.load:.2f}")


def summarize(ours: list[RunResult], theirs: list[RunResult]) -> None:
    our_step = statistics.median(r.median_step() for r in ours)
    trl_step = statistics.median(r.median_step() for r in theirs)
    n = len(ours)
    print(f"\nSummary: median over {n} run(s) per side of each run's median step time (first step dropped)")
    print(f"  {'TRL GRPOTrainer':<44} {trl_step * 1e3:8.1f} ms")
    print(f"  {'nsr-megatron':<44} {our_step * 1e3:8.1f} ms")
    print(f"  {'ratio ours / TRL':<44} {our_step / trl_step:8.3f}   (TRL takes {trl_step / our_step:.2f}x as long)")

    def table(title: str, runs: list[RunResult], labels: dict[str, str], rest: str) -> None:
        step = statistics.median(r.median_step() for r in runs)
        per_run = [r.median_phases() for r in runs]
        meds = {name: statistics.median(p[name] for p in per_run) for name in labels}
        other = statistics.median(
            statistics.median(s - sum(r.phases[name][i] for name in labels) for i, s in enumerate(r.steps) if i > 0)
            for r in runs)
        print(f"\n{title} per phase (median over runs of per-run medians):")
        for name, label in labels.items():
            print(f"  {label:<44} {meds[name] * 1e3:8.1f} ms  {meds[name] / step:6.1%}")
        print(f"  {rest:<44} {other * 1e3:8.1f} ms  {other / step:6.1%}")
        print(f"  {'step':<44} {step * 1e3:8.1f} ms")

    table("nsr-megatron", ours, {"rollout": "rollout (embedded engine)", "rewards": "rewards",
                                 "logprobs": "logprobs (packing; old = training forward's)",
                                 "train": "train (forward, backward, optimizer)", "weight_sync": "weight sync"},
          "other (advantages, metrics)")
    table("TRL", theirs, {"generate": "generation (model.generate)", "reward_fn": "reward function"},
          "rest (forward, backward, optimizer, ...)")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="RL steps per run, the first one dropped (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="TRL run + our run pairs (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of both sides (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1, help="model init and training seed (default: %(default)s)")
    ap.add_argument("--trl-python", type=Path, default=TRL_PYTHON, help="python of the TRL venv (default: %(default)s)")
    ap.add_argument("--in-process", action="store_true",
                    help="run ours in this process, one run after another (the old way), not a fresh process per run")
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoint, data and runs here (default: a temp dir)")
    # --trl-worker mode (internal): this file under the TRL venv's python.
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    # --ours-worker mode (internal): one of our runs in a fresh process of the project's python.
    ap.add_argument("--ours-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is dropped)")

    if args.trl_worker:
        trl_worker(args.hf_dir, args.data, args.steps, args.threads, args.seed, args.worker_out)
        return
    if args.ours_worker:
        ours_worker(args.hf_dir, args.data, args.run_dir, args.steps, args.threads, args.seed, args.worker_out)
        return

    if not args.trl_python.exists():
        raise SystemExit(f"{args.trl_python} not found: run `bash scripts/setup_trl.sh` first.")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import megatron.core
    import torch
    import transformers

    from nsr_megatron.data.synthetic import generate, write_jsonl
    from nsr_megatron.data.tokenizer import save_synthetic_tokenizer
    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        hf_dir = work / "hf-init"
        if not (hf_dir / "config.json").exists():
            create_tiny_hf_checkpoint(hf_dir, seed=args.seed, **TINY_MODEL)
            save_synthetic_tokenizer(hf_dir)
        data = write_jsonl(generate(TASK, NUM_RECORDS, seed=0), work / "data" / f"{TASK}.jsonl")
        params = count_parameters(hf_dir)
        print(f"model: tiny Qwen3-MoE {params / 1e6:.2f}M parameters ({params:,}), hidden "
              f"{TINY_MODEL['hidden_size']}, {TINY_MODEL['num_hidden_layers']} layers, {TINY_MODEL['num_experts']} "
              f"experts top-{TINY_MODEL['num_experts_per_tok']}, fp32")
        print(f"task: {TASK}, {PROMPTS_PER_STEP} prompts x {SAMPLES_PER_PROMPT} samples/step, <= {MAX_NEW_TOKENS} new "
              f"tokens, T={TEMPERATURE}, DAPO eps {EPS_LOW}/{EPS_HIGH}, lr {LR} constant, 1 optimizer step/batch")
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        print(f"{args.rounds} round(s) of TRL then ours, {args.steps} steps per run, {args.threads} torch threads, "
              f"load average {load:.2f} on {cores} cores")
        if load + args.threads > cores + 0.5:
            print(f"warning: other processes already load the CPU ({load:.2f} on {cores} cores): step times are "
                  "inflated and noisy, with more than one thread especially (every parallel op waits for its "
                  "descheduled threads); measure on an idle machine.")

        ours: list[RunResult] = []
        theirs: list[RunResult] = []
        for i in range(1, args.rounds + 1):
            theirs.append(run_trl(args.trl_python, hf_dir, data, work, args.steps, args.threads, args.seed))
            print(run_line(i, theirs[-1]), flush=True)
            run = run_ours if args.in_process else run_ours_fresh
            ours.append(run(hf_dir, data, work / f"ours-{i}", args.steps, args.threads, args.seed))
            print(run_line(i, ours[-1]), flush=True)

        tv = theirs[0].extra["versions"]
        print(f"\nversions: ours: torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers "
              f"{transformers.__version__} | TRL side: trl {tv['trl']}, torch {tv['torch']}, transformers "
              f"{tv['transformers']}, accelerate {tv['accelerate']}, datasets {tv['datasets']} "
              f"({theirs[0].extra['implementation']}; model as loaded by TRL: {theirs[0].extra['num_params']:,} "
              f"parameters)")
        summarize(ours, theirs)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
