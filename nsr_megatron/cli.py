"""``nsr-megatron`` command line.

Subcommands:
  quickstart  RL (NSR) on a synthetic task from a tiny random HF model, on this machine (CPU or GPU)
  train       RL training from a config: nsr-megatron train --config FILE [key=value ...]
  smoke       build a tiny MoE policy and train it a few steps on random tokens, printing throughput
  validate    check a config and its inputs (model, tokenizer, data, reward, checkpoints, layout) without training
  plot        draw a run's plots, or compare runs
  profile     a few steps under torch.profiler with the MoE routing profiler; writes a trace and a report
  report      render a run's report (report.md: summary, plots, routing)
  eval        avg@k, pass@1..k and maj@k of an HF model or a training checkpoint on a prompt file
  plan        per-GPU memory of a layout on a cluster (parameters, gradients, optimizer, activations, rollout)
  compare     losses x seeds, resumable: mean curves with 95% intervals, a table of final and best values, paired
              differences against a baseline beside an A/A noise floor

Every subcommand also runs under ``torchrun`` (any TP / PP / EP the world size allows).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nsr_megatron.config import Config, ConfigError, SmokeConfig, load_config, read_hf_config

log = logging.getLogger("nsr_megatron")

QUICKSTART_EVAL_PROBLEMS = 32  # problems in a generated held-out set (eval.data: generate)
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # the built-in quickstart and smoke configs


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _quiet_third_party() -> None:
    # megatron-core warns once per module that TE / apex are absent; on CPU that is expected.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*reduce_scatter_tensor.*")
    warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecating ShardedTensor.*")


def _prepare_smoke(config: SmokeConfig, scratch: Path) -> tuple[SmokeConfig, Any]:
    """Resolve the HF config (a tiny one when none is given) and validate the layout, before any work."""
    from nsr_megatron.models.hf_config import arch_from_hf, validate_layout
    from nsr_megatron.models.tiny import write_tiny_hf_config

    if not config.model.hf_path:
        config.model.hf_path = str(write_tiny_hf_config(scratch / "tiny-moe", **config.model.tiny))
    arch = arch_from_hf(read_hf_config(config.model.hf_path))
    validate_layout(arch, config.model, config.parallel, _world_size())
    return config, arch


def cmd_validate(args: argparse.Namespace) -> int:
    """Every check ``train`` makes before it starts, for a world of ``--world-size`` (or nodes x GPUs) processes."""
    from nsr_megatron.trainer.preflight import preflight

    world = _validate_world_size(args)
    config: Config = load_config(args.config, args.overrides)
    if args.model_config:  # a recipe for a cluster: the config against this architecture, nothing read from disk
        return _validate_for_cluster(args, config, world)
    with tempfile.TemporaryDirectory() as scratch:
        if not config.model.hf_path or _no_prompts(config):  # the quickstart's generated model and data
            config = prepare_quickstart(config, task=args.task, num_prompts=args.num_prompts, where=Path(scratch))
        inputs = preflight(config, world_size=world)
    arch, p = inputs.arch, config.parallel
    longest, line = inputs.dataset.longest_prompt()
    resume = f"resumes from {inputs.resume_from}" if inputs.resume_from else "starts at step 0"
    print(
        f"config OK: {arch.model_type}, {arch.num_layers} layers, {arch.num_experts or 'no'} experts; "
        f"tp={p.tp} pp={p.pp} ep={p.ep} etp={p.etp} cp={p.cp} on {world} process(es), "
        f"dp={world // (p.tp * p.pp * p.cp)}\n"
        f"  data: {len(inputs.dataset)} prompts from {inputs.dataset.source} (longest {longest} tokens, line {line}); "
        f"stop tokens {list(inputs.stop_token_ids)}; reward {config.reward.name!r}; {resume}"
    )
    return 0


def _cluster_arch(args: argparse.Namespace, config: Config) -> Any:
    """The architecture from ``--model-config`` (a config.json, e.g. a recipe's) or from ``model.hf_path``."""
    from nsr_megatron.config import read_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf

    source = args.model_config or config.model.hf_path
    if not source:
        raise ConfigError("no architecture: set model.hf_path or pass --model-config PATH/config.json.")
    return arch_from_hf(read_hf_config(source))


def _validate_for_cluster(args: argparse.Namespace, config: Config, world: int) -> int:
    """``validate --model-config``: the settings against the architecture and the layout on a GPU cluster (CUDA and
    Transformer Engine assumed there), then the memory plan when ``--gpu-mem-gb`` is given. Weights, tokenizer
    and data live on the cluster and are not read."""
    from nsr_megatron.models.hf_config import validate_layout
    from nsr_megatron.models.memory import GiB, fits, plan_from_config

    arch = _cluster_arch(args, config)
    validate_layout(arch, config.model, config.parallel, world, cuda_available=True, have_te=True)
    if config.algorithm.routing_replay != "off" and not arch.is_moe:
        raise ConfigError(f"algorithm.routing_replay={config.algorithm.routing_replay} needs an MoE model.")
    p = config.parallel
    print(f"config OK for {world} GPUs: {arch.model_type}, {arch.num_layers} layers, {arch.num_experts or 'no'} "
          f"experts; tp={p.tp} pp={p.pp} ep={p.ep} etp={p.etp or p.tp} dp={world // (p.tp * p.pp * p.cp)}")
    if args.gpu_mem_gb:
        plan = plan_from_config(config, arch, world, args.gpu_mem_gb * GiB)
        if not fits(plan, args.gpu_mem_gb * GiB):
            raise ConfigError(f"the layout does not fit: peak {plan.peak / GiB:.1f} GiB per GPU > 90% of "
                              f"{args.gpu_mem_gb:g} GiB; `nsr-megatron plan` shows the breakdown and a layout "
                              "that fits.")
        print(f"memory OK: peak {plan.peak / GiB:.1f} GiB of {args.gpu_mem_gb:g} GiB per GPU")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-GPU memory of the config's layout on the stated cluster; exit 1 when it does not fit."""
    from nsr_megatron.models.hf_config import validate_layout
    from nsr_megatron.models.memory import GiB, describe, fits, plan_from_config, suggest

    config: Config = load_config(args.config, args.overrides)
    arch = _cluster_arch(args, config)
    world, gpu_bytes = args.nodes * args.gpus_per_node, args.gpu_mem_gb * GiB
    validate_layout(arch, config.model, config.parallel, world, cuda_available=True, have_te=True)
    plan = plan_from_config(config, arch, world, gpu_bytes)
    print("\n".join(describe(plan, gpu_bytes)))
    if fits(plan, gpu_bytes):
        print(f"fits: peak {plan.peak / GiB:.1f} GiB of {args.gpu_mem_gb:g} GiB per GPU (90% usable)")
        return 0
    print(f"does not fit: peak {plan.peak / GiB:.1f} GiB > 90% of {args.gpu_mem_gb:g} GiB per GPU")
    hint = suggest(config, arch, world, gpu_bytes)
    print(f"nearest settings that fit: {hint}" if hint else
          f"no layout fits {world} GPUs of {args.gpu_mem_gb:g} GiB: add nodes or shorten the sequences (every memory option on).")
    return 1


def _eval_model_dir(model: str, scratch: Path) -> tuple[Path, str]:
    """An HF folder for ``--model``: itself when it holds config.json, else the newest checkpoint in it (a step
    folder, a checkpoints root or a run folder), converted into ``scratch``. Returns (folder, description)."""
    from nsr_megatron.convert import find_hf_config, mcore_to_hf
    from nsr_megatron.trainer.checkpoint import latest_checkpoint

    path = Path(model)
    if (path / "config.json").is_file():
        return path, str(path)
    step = path if (path / "nsr_meta.json").is_file() else None
    for root in (path, path / "checkpoints"):
        if step is None and root.is_dir():
            step = latest_checkpoint(root)
    if step is None:
        raise ConfigError(f"--model {model}: neither a Hugging Face folder (config.json) nor a training checkpoint "
                          "(a step_* folder, a checkpoints folder or a run folder); pass one of those.")
    out = mcore_to_hf(step, scratch / "hf", hf_config=find_hf_config(step), progress=False)
    return out, f"{step} (converted)"


def cmd_eval(args: argparse.Namespace) -> int:
    """avg@k, pass@1..k and maj@k of a model on a prompt file (see ``nsr_megatron.evaluation``)."""
    import json

    from tqdm import tqdm

    from nsr_megatron.evaluation import ProblemResult, generate_and_score, problem_results, summarize
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.rewards import RewardScorer
    from nsr_megatron.rollout import SamplingParams
    from nsr_megatron.rollout.engine import prompt_seeds
    from nsr_megatron.trainer.preflight import _load_dataset, load_tokenizer, stop_token_ids
    from nsr_megatron.trainer.runtime import standalone_engine

    if args.k < 1:
        raise ConfigError(f"--k {args.k} must be >= 1 (samples per problem).")
    config: Config = load_config(args.config, [f"data.path={args.data}", *args.overrides])
    sections = {o.split("=", 1)[0].split(".", 1)[0] for o in args.overrides}
    if sections - {"data", "reward", "rollout", "model"}:
        raise ConfigError(f"eval takes overrides of data.*, reward.*, rollout.* and model.* only; got "
                          f"{sorted(sections - {'data', 'reward', 'rollout', 'model'})}.")
    out_path = Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        hf_dir, described = _eval_model_dir(args.model, Path(scratch))
        config.model.hf_path = str(hf_dir)
        arch = arch_from_hf(read_hf_config(hf_dir))
        tokenizer = load_tokenizer(config.model, arch)
        dataset = _load_dataset(config, tokenizer)
        params = SamplingParams(max_new_tokens=args.max_new_tokens or config.rollout.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, top_k=config.rollout.top_k,
                                stop_token_ids=stop_token_ids(hf_dir, tokenizer, arch.vocab_size))
        seeds = prompt_seeds(args.seed, len(dataset))  # problem i's draws depend on (seed, i) only
        results: list[ProblemResult] = []
        engine = standalone_engine(config, Path(scratch))
        try:
            with RewardScorer(config.reward) as scorer:
                bar = tqdm(total=len(dataset), desc="eval", unit="problem", disable=args.no_progress)
                for start in range(0, len(dataset), args.batch):
                    records = [dataset[i] for i in range(start, min(len(dataset), start + args.batch))]
                    gens, rewards, _, texts = generate_and_score(engine, scorer, tokenizer, records, params,
                                                                 n=args.k, seeds=seeds[start : start + len(records)])
                    results += problem_results(records, gens, rewards, texts, args.k, args.correct_threshold)
                    bar.update(len(records))
                bar.close()
        finally:
            engine.close()
    summary = summarize(results, args.k)
    report = {**summary, "k": args.k, "problems": len(results), "model": described, "data": args.data,
              "sampling": {"temperature": args.temperature, "top_p": args.top_p,
                           "max_new_tokens": params.max_new_tokens, "seed": args.seed},
              "reward": config.reward.name, "correct_threshold": args.correct_threshold,
              "per_problem": [r.to_json() for r in results]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
    os.replace(tmp, out_path)
    keys = [f"avg@{args.k}", *[f"pass@{j}" for j in sorted({1, min(2, args.k), min(4, args.k), min(8, args.k),
                                                              args.k})], f"maj@{args.k}"]
    print(f"eval: {len(results)} problems x {args.k} samples, {described}")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| "
          + " | ".join(f"{summary[k]:.4f}" for k in keys) + " |")
    print(f"eval: wrote {out_path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train every (loss, seed) in turn, resumably (and ``--aa``'s repeat), then aggregate: curves with 95% intervals,
    a table of finals, paired differences against ``--baseline`` beside the A/A noise floor, a PNG."""
    import json

    from nsr_megatron.config import loss_draws
    from nsr_megatron.losses import PRESETS, PolicyLossConfig
    from nsr_megatron.losses.rng import derive_seed
    from nsr_megatron.telemetry.compare import aggregate, plot_comparison, read_eval_problems, read_runs, report
    from nsr_megatron.telemetry.status import read_status

    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    unknown = [x for x in losses if x not in PRESETS]
    if unknown or not losses:
        raise ConfigError(f"--losses {args.losses!r}: unknown {unknown}; choose among {sorted(PRESETS)}.")
    baseline = args.baseline or losses[0]
    for flag, name in (("--baseline", baseline), ("--aa", args.aa)):
        if name and name not in losses:
            raise ConfigError(f"{flag} {name!r} is not among --losses {losses}; add it there or name one of those.")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} must be >= 1.")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} must be >= 1 (runs trained at once).")
    seeds = list(range(1, args.seeds + 1))
    out = Path(args.out)
    config_path = args.config or task_config(args.task)
    load_config(config_path, args.overrides)  # a bad override fails here, not later
    for loss in losses:
        loss_config: PolicyLossConfig = load_config(config_path, [*args.overrides, f"loss.name={loss}"]).loss
        departures: dict[str, tuple[Any, Any]] = loss_config.departures()
        if departures:
            print(f"compare: {loss} runs with " + ", ".join(f"loss.{k}={mine!r} (its preset: {theirs!r})"
                                                        for k, (mine, theirs) in departures.items())
                  + ", set by the config or the overrides", flush=True)
    base = ["train", "--config", args.config] if args.config else ["quickstart", "--task", args.task]
    groups = [(loss, loss, False) for loss in losses]  # (label, loss, the A/A repeat?)
    aa_rescue = False
    if args.aa:
        groups.append((f"{args.aa}-aa", args.aa, True))
        aa_rescue = loss_draws(load_config(config_path, [*args.overrides, f"loss.name={args.aa}"]).loss)
    runs: dict[str, dict[int, Path]] = {label: {} for label, _, _ in groups}
    todo: list[tuple[str, int, list[str], Path]] = []
    for label, loss, repeat in groups:
        for seed in seeds:
            run_dir = out / "runs" / f"{label}-seed{seed}"
            status = read_status(run_dir) or {}
            if status.get("phase") == "done":
                print(f"compare: {label} seed {seed}: done before, kept ({run_dir})", flush=True)
                runs[label][seed] = run_dir
                continue
            if args.no_train:
                print(f"compare: {label} seed {seed}: not done ({run_dir}), left out (--no-train)", flush=True)
                continue
            runs[label][seed] = run_dir
            # The A/A repeat keeps the seed's initial model and prompt order and draws other samples and rescues.
            draws = ([f"rollout.sampling_seed={derive_seed(seed, 'aa/sampling')}"]
                     + ([f"loss.seed={derive_seed(seed, 'aa/rescue')}"] if aa_rescue else [])) if repeat else []
            cmd = [sys.executable, "-m", "nsr_megatron.cli", *base, "--no-progress", *args.overrides,
                   f"loss.name={loss}", f"run.seed={seed}", *draws, f"run.run_dir={run_dir}", "checkpoint.resume=auto"]
            todo.append((label, seed, cmd, run_dir))
    if todo and _compare_train(todo, jobs=args.jobs) != 0:
        return 1
    runs = {label: r for label, r in runs.items() if r}
    if not runs:
        raise ConfigError(f"--no-train: no finished run under {out / 'runs'}; train them first (drop --no-train).")
    aa = (args.aa, f"{args.aa}-aa") if args.aa and args.aa in runs and f"{args.aa}-aa" in runs else None
    summary = aggregate(read_runs(runs), tail=args.tail, baseline=baseline if baseline in runs else None, aa=aa,
                        problems={label: {s: read_eval_problems(d) for s, d in r.items()} for label, r in runs.items()})
    (out / "compare.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    text = report(summary, title=f"{', '.join(runs)} over seeds {seeds}")
    (out / "compare.md").write_text(text, encoding="utf-8")
    png = plot_comparison(summary, out / "compare.png")
    print(text)
    print(f"compare: wrote {out / 'compare.md'}, {png} and {out / 'compare.json'}")
    return 0


def _compare_train(todo: list[tuple[str, int, list[str], Path]], *, jobs: int) -> int:
    """Run ``compare``'s training commands, ``jobs`` at a time, each logging to ``<label>-seed<seed>.log``. With
    ``jobs > 1`` and no ``OMP_NUM_THREADS`` set, each run gets an equal share of the CPU cores as its threads. After a
    failure no new run starts; the ones running finish. Returns 0, or 1 after a failure."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    failed: list[str] = []

    def train(label: str, seed: int, cmd: list[str], run_dir: Path) -> None:
        if failed:
            return
        print(f"compare: {label} seed {seed}: training in {run_dir}", flush=True)
        log = run_dir.parent / f"{label}-seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            failed.append(label)
            print(f"compare: {label} seed {seed} failed (exit {code}); its log: {log}. Run the same command "
                  "again to continue from there.", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(train, *item) for item in todo]:
            future.result()
    return 1 if failed else 0


def _validate_world_size(args: argparse.Namespace) -> int:
    if args.world_size is not None and (args.nodes is not None or args.gpus_per_node is not None):
        raise ConfigError("pass either --world-size or --nodes/--gpus-per-node, not both.")
    if args.nodes is not None or args.gpus_per_node is not None:
        world = (args.nodes or 1) * (args.gpus_per_node or 1)
    else:
        world = args.world_size if args.world_size is not None else _world_size()
    if world < 1:
        raise ConfigError(f"the world size must be >= 1 (got {world}); pass --world-size N or --nodes N "
                          f"--gpus-per-node G.")
    return world


def cmd_smoke(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from nsr_megatron import parallel
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.trainer import actor

    config = load_config(args.config, args.overrides, cls=SmokeConfig)
    with tempfile.TemporaryDirectory() as scratch:
        config, arch = _prepare_smoke(config, Path(scratch))
        run, batch = config.run, config.batch
        state = parallel.initialize(config.parallel, seed=run.seed)
        try:
            policy = build_model(arch, model=config.model, parallel=config.parallel, optimizer=config.optimizer)
            n_params = sum(p.numel() for p in policy.gpt.parameters())
            if state.rank == 0:
                print(
                    f"smoke: {arch.model_type} {n_params / 1e6:.2f}M params/rank on {state.device} "
                    f"({state.backend}, world {state.world_size}, tp={config.parallel.tp} "
                    f"pp={config.parallel.pp} ep={config.parallel.ep})",
                    flush=True,
                )
            gen = torch.Generator().manual_seed(run.seed + state.dp_rank)
            n_micro = max(1, batch.global_batch_size // (batch.micro_batch_size * state.dp_size))

            def micro_batches() -> list[dict[str, torch.Tensor]]:
                out = []
                for _ in range(n_micro):
                    tokens = torch.randint(
                        0, arch.vocab_size, (batch.micro_batch_size, batch.seq_length + 1), generator=gen
                    )
                    out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:]})
                return out

            def ce(
                logits: torch.Tensor, batch: dict[str, torch.Tensor]
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

                loss = vocab_parallel_cross_entropy(logits.float(), batch["targets"]).mean()
                return loss, {"loss": loss.detach()}

            tokens_per_step = n_micro * batch.micro_batch_size * batch.seq_length * state.dp_size
            bar = tqdm(range(run.steps), desc="smoke", disable=state.rank != 0 or args.no_progress, file=sys.stdout)
            timed_tokens, timed_seconds, loss = 0, 0.0, float("nan")
            for step in bar:
                batches = micro_batches()
                t0 = time.perf_counter()
                actor.zero_grads(policy)
                metrics = actor.forward_backward(policy, batches, ce)
                grad_norm = actor.optimizer_step(policy)
                dt = time.perf_counter() - t0
                if step > 0:  # the first step includes one-time setup
                    timed_tokens += tokens_per_step
                    timed_seconds += dt
                if metrics:
                    loss = float(sum(float(m["loss"]) for m in metrics) / len(metrics))
                bar.set_postfix(
                    loss=f"{loss:.4f}", grad_norm=f"{grad_norm:.3f}", tok_s=f"{tokens_per_step / dt:.0f}"
                )
            if state.rank == 0:
                rate = timed_tokens / timed_seconds if timed_seconds else float("nan")
                print(
                    f"smoke: {run.steps} steps, final loss {loss:.4f}, "
                    f"forward+backward+optimizer throughput {rate:.0f} tokens/s",
                    flush=True,
                )
        finally:
            parallel.destroy()
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _wait_for(path: Path, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {_rank()}: {path} did not appear within {timeout_s:.0f}s (rank 0 writes it)")
        time.sleep(0.2)


def task_config(task: str) -> str:
    """The built-in config of a synthetic task: ``configs/<task>.yaml`` where one exists (``repeat``), else the
    quickstart's."""
    own = CONFIGS_DIR / f"{task}.yaml"
    return str(own if own.is_file() and task not in ("smoke", "arithmetic-sft") else CONFIGS_DIR / "quickstart.yaml")


def _write_once(path: Path, records: list[dict[str, str]]) -> None:
    from nsr_megatron.data.synthetic import write_jsonl

    if _rank() == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(records, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    _wait_for(path)


def _no_prompts(config: Config) -> bool:
    """The prompts come from a file that the config does not name (the quickstart generates one)."""
    return config.data.source == "file" and not config.data.path


def _quickstart_model(config: Config, root: Path) -> Path:
    """The quickstart's tiny random HF checkpoint (with the synthetic tokenizer) at ``root/hf-init``: rank 0 makes
    it once, atomically; the other ranks wait for it."""
    from nsr_megatron.data.tokenizer import save_synthetic_tokenizer
    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

    hf_dir = root / "hf-init"
    if _rank() == 0 and not (hf_dir / "config.json").exists():
        tmp = root / f".tmp-hf-init-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        create_tiny_hf_checkpoint(tmp, seed=config.run.seed, **config.model.tiny)
        save_synthetic_tokenizer(tmp)
        try:
            os.replace(tmp, hf_dir)
        except OSError:  # made meanwhile by another process: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
    _wait_for(hf_dir / "config.json")
    return hf_dir


def model_path(config_arg: str, overrides: list[str]) -> str:
    """The HF model folder that ``train --config CONFIG_ARG OVERRIDES`` (or ``quickstart OVERRIDES`` when
    CONFIG_ARG is ``quickstart``) starts from, for tools that must load the model before the trainer starts
    (examples/slurm/train.sbatch's dedicated engines). The quickstart's generated model is made now, in the run
    directory, where the trainer finds and keeps it."""
    config: Config = load_config(task_config("echo") if config_arg == "quickstart" else config_arg, overrides)
    if config.model.hf_path:
        return config.model.hf_path
    if config_arg != "quickstart":
        raise ConfigError(f"{config_arg} sets no model.hf_path: name the HF model folder the run starts from.")
    return str(_quickstart_model(config, Path(config.run.run_dir)))


def prepare_quickstart(config: Config, *, task: str, num_prompts: int, where: Path | None = None) -> Config:
    """Fill in what the quickstart generates: a tiny random HF checkpoint (with the synthetic tokenizer)
    and a synthetic task's JSONL, in ``where`` (default: the run directory); with ``eval.data: generate`` also a
    held-out set of the task (another seed). Rank 0 writes them atomically; the other ranks wait for them."""
    from nsr_megatron.data.synthetic import generate

    root = where if where is not None else Path(config.run.run_dir)
    if not config.model.hf_path:
        config.model.hf_path = str(_quickstart_model(config, root))
    if config.data.source == "file" and not config.data.path:
        data = root / "data" / f"{task}.jsonl"
        _write_once(data, generate(task, num_prompts, seed=config.data.seed))
        config.data.path = str(data)
    if config.eval.data == "generate":
        held_out = root / "data" / f"{task}-eval.jsonl"
        _write_once(held_out, generate(task, QUICKSTART_EVAL_PROBLEMS, seed=config.data.seed + 1))
        config.eval.data = str(held_out)
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from nsr_megatron import parallel
    from nsr_megatron.trainer.loop import train

    quickstart = getattr(args, "quickstart", False)
    config: Config = load_config(args.config or (task_config(args.task) if quickstart else None), args.overrides)
    if quickstart and args.task == "arithmetic":
        from nsr_megatron.trainer.warm_start import prepare_arithmetic

        config = prepare_arithmetic(config, sft_config=args.sft_config, cache=args.warm_start_cache,
                                    progress=False if args.no_progress else None, world_size=_world_size())
    elif quickstart:
        config = prepare_quickstart(config, task=args.task, num_prompts=args.num_prompts)
    try:
        rt = train(config, world_size=_world_size(), progress=False if args.no_progress else None)
    finally:
        parallel.destroy()
    if rt.is_logger:
        from nsr_megatron.telemetry import read_metrics
        from nsr_megatron.telemetry.summary import learning_summary

        rows = read_metrics(rt.run_dir / "metrics.jsonl")
        verdict = learning_summary([r["reward/mean"] for r in rows]).line() if rows else "no steps were logged"
        print(f"train: {len(rows)} steps in {rt.run_dir}; {verdict}", flush=True)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from nsr_megatron.trainer.sft import SFTRunConfig, sft

    config = load_config(args.config, args.overrides, cls=SFTRunConfig)
    out = sft(config, world_size=_world_size(), progress=False if args.no_progress else None)
    if out["rank"] == 0:
        from nsr_megatron.telemetry import read_metrics

        rows = read_metrics(Path(out["run_dir"]) / "metrics.jsonl")
        line = f"sft: {len(rows)} steps in {out['run_dir']}"
        if rows:
            line += f"; loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}"
            held = [r for r in rows if "eval/loss" in r]
            if held:
                last = held[-1]
                line += (f"; held-out loss {last['eval/loss']:.4f}, token accuracy {last['eval/token_accuracy']:.3f}, "
                         f"exact match {last['eval/exact_match']:.3f}")
        print(line, flush=True)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """A few RL steps under ``torch.profiler`` (named ranges per phase, NVTX on CUDA) with the routing profiler on
    (MoE models); writes the trace, the routing data and ``report.md`` into ``--out``."""
    import torch

    from nsr_megatron import parallel
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.telemetry.report import write_report
    from nsr_megatron.trainer.loop import train

    config: Config = load_config(args.config, args.overrides)
    out = Path(args.out or f"{config.run.run_dir.rstrip('/')}-profile")
    config.run.run_dir, config.run.steps = str(out), args.steps
    config.checkpoint.resume, config.checkpoint.save_interval = "", 0
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; profile into a new folder (pass --out).")
    config = prepare_quickstart(config, task=args.task, num_prompts=args.num_prompts) if (
        not config.model.hf_path or _no_prompts(config)) else config
    if config.profile.routing == "off" and arch_from_hf(read_hf_config(config.model.hf_path)).is_moe:
        config.profile.routing = "full"
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    handler = torch.profiler.tensorboard_trace_handler(str(out / "trace"), worker_name=f"rank{_rank()}")
    try:
        with torch.profiler.profile(activities=activities, on_trace_ready=handler):
            rt = train(config, world_size=_world_size(), progress=False, annotate=True)
    finally:
        parallel.destroy()
    if rt.is_logger:
        print(f"profile: {args.steps} steps in {out}; report {write_report(out)}", flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from nsr_megatron.telemetry.report import write_report

    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise ConfigError(f"report: {args.run_dir} has no metrics.jsonl; pass the run.run_dir of a run.")
    print(f"report: wrote {write_report(args.run_dir)}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from nsr_megatron.telemetry import plot_reward_comparison, plot_run

    if not args.runs and not args.compare:
        raise ConfigError("plot: nothing to draw; pass one or more run directories (nsr-megatron plot runs/x) or "
                          "--compare LABEL=RUN_DIR ...")
    for run_dir in args.runs:
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            raise ConfigError(f"plot: {run_dir} has no metrics.jsonl; pass the run.run_dir of a run.")
    if args.compare:
        runs = []
        for item in args.compare:
            label, _, path = item.partition("=")
            metrics = Path(path or label) / "metrics.jsonl"
            if not metrics.is_file():
                raise ConfigError(f"--compare {item!r}: {metrics} does not exist; pass LABEL=RUN_DIR of a finished run.")
            runs.append((label if path else Path(label).name, metrics))
        out = plot_reward_comparison(runs, args.out or "reward_comparison.png", key=args.key, smooth=args.smooth or 1)
        print(f"plot: wrote {out}")
    for run_dir in args.runs:
        for path in plot_run(run_dir, smooth=args.smooth or None):
            print(f"plot: wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsr-megatron", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add_config_args(sp: argparse.ArgumentParser, default: str | None) -> None:
        sp.add_argument("--config", default=default, help="YAML config file (default: %(default)s)")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. parallel.tp=2 run.steps=5")

    train = sub.add_parser("train", help="RL training from a config (also under torchrun)")
    add_config_args(train, None)
    train.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    train.set_defaults(func=cmd_train, quickstart=False)

    quick = sub.add_parser("quickstart", help="RL with NSR on a synthetic task from a tiny random model")
    add_config_args(quick, None)
    quick.add_argument("--task", default="echo", help="echo | successor | add | repeat (synthetic), or arithmetic "
                       "(reasoning-gym's chain_sum from an SFT warm start, configs/arithmetic.yaml) (default: "
                       "%(default)s); the config defaults to configs/repeat.yaml for repeat, else quickstart.yaml")
    quick.add_argument("--num-prompts", type=int, default=1024, help="prompts in the generated data set")
    quick.add_argument("--sft-config", default=None, help="--task arithmetic: the warm start's SFT config "
                       "(default: configs/arithmetic-sft.yaml)")
    quick.add_argument("--warm-start-cache", default=None, help="--task arithmetic: where the task's data, model and "
                       "SFT checkpoint are kept and reused (default: <run_dir>/../warm-start)")
    quick.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    quick.set_defaults(func=cmd_train, quickstart=True)

    sft_p = sub.add_parser("sft", help="supervised fine-tuning on prompt / response pairs (the cold start before RL)")
    add_config_args(sft_p, None)
    sft_p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    sft_p.set_defaults(func=cmd_sft)

    smoke = sub.add_parser("smoke", help="train a tiny MoE a few steps on random tokens, print tokens/s")
    add_config_args(smoke, str(CONFIGS_DIR / "smoke.yaml"))
    smoke.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    smoke.set_defaults(func=cmd_smoke)

    plot = sub.add_parser("plot", help="draw a run's PNG plots, or several runs' reward curves in one PNG")
    plot.add_argument("runs", nargs="*", help="run directories to plot (each gets <run_dir>/plots/*.png)")
    plot.add_argument("--compare", nargs="+", default=[], metavar="LABEL=RUN_DIR", help="runs to overlay")
    plot.add_argument("--out", default="", help="comparison PNG path (default reward_comparison.png)")
    plot.add_argument("--key", default="reward/mean", help="metric to compare (default: %(default)s)")
    plot.add_argument("--smooth", type=int, default=0,
                      help="moving-average window in steps (default: a tenth of the run, at most 10)")
    plot.set_defaults(func=cmd_plot, config=None)

    prof = sub.add_parser("profile", help="a few RL steps under torch.profiler, with the MoE routing report")
    add_config_args(prof, str(CONFIGS_DIR / "quickstart.yaml"))
    prof.add_argument("--steps", type=int, default=3, help="RL steps to profile (default: %(default)s)")
    prof.add_argument("--out", default="", help="output folder (default: <run.run_dir>-profile)")
    prof.add_argument("--task", default="echo", help="quickstart task when the config names no data")
    prof.add_argument("--num-prompts", type=int, default=1024, help=argparse.SUPPRESS)
    prof.set_defaults(func=cmd_profile)

    report = sub.add_parser("report", help="render a run's report (plots, summary, routing) as report.md")
    report.add_argument("run_dir", help="the run.run_dir of a run")
    report.set_defaults(func=cmd_report, config=None)

    validate = sub.add_parser("validate", help="check a config and every input it names; build nothing")
    add_config_args(validate, None)
    validate.add_argument("--world-size", type=int, default=None,
                          help="processes of the launch to check (default: $WORLD_SIZE or 1)")
    validate.add_argument("--nodes", type=int, default=None, help="with --gpus-per-node: world = nodes x GPUs")
    validate.add_argument("--gpus-per-node", type=int, default=None, help="processes per node")
    validate.add_argument("--task", default="echo", help="quickstart task when the config names no data")
    validate.add_argument("--num-prompts", type=int, default=1024, help=argparse.SUPPRESS)
    validate.add_argument("--model-config", default="",
                          help="check against this config.json (a recipe's cluster check; reads no weights or data)")
    validate.add_argument("--gpu-mem-gb", type=float, default=0.0,
                          help="with --model-config: also check the memory plan against GPUs of this size")
    validate.set_defaults(func=cmd_validate)

    ev = sub.add_parser("eval", help="avg@k, pass@k and maj@k of a model (HF folder or training checkpoint)")
    add_config_args(ev, None)
    ev.add_argument("--model", required=True, help="an HF folder, or a checkpoint (step folder, checkpoints "
                    "folder or run folder: the newest step, converted on the fly)")
    ev.add_argument("--data", required=True, help="JSONL or Parquet prompt file (data.* overrides apply)")
    ev.add_argument("--out", required=True, help="JSON file for the summary and the per-problem results")
    ev.add_argument("--k", type=int, default=16, help="samples per problem (default: %(default)s)")
    ev.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    ev.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=int, default=0, help="(default: rollout.max_new_tokens)")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    ev.add_argument("--batch", type=int, default=64, help="problems per engine call (default: %(default)s)")
    ev.add_argument("--correct-threshold", type=float, default=1.0,
                    help="a sample is correct when its reward is at least this (default: %(default)s)")
    ev.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    ev.set_defaults(func=cmd_eval)

    cmp = sub.add_parser("compare", help="train losses x seeds (resumably), then curves with 95%% intervals, a "
                         "table and paired differences against a baseline")
    add_config_args(cmp, None)
    cmp.add_argument("--losses", default="dapo,nsr,nsr-decay", help="comma-separated loss presets "
                     "(default: %(default)s)")
    cmp.add_argument("--seeds", type=int, default=5, help="seeds 1..N per loss (default: %(default)s)")
    cmp.add_argument("--task", default="echo", help="quickstart task when no --config (default: %(default)s)")
    cmp.add_argument("--out", default="runs/compare", help="folder for the runs and the results (default: "
                     "%(default)s)")
    cmp.add_argument("--tail", type=int, default=0, help="steps in a run's final value (default: the last tenth)")
    cmp.add_argument("--baseline", default="", metavar="LOSS", help="the loss every other one is compared with, "
                     "seed by seed: mean paired difference, 95%% interval, wins/losses/ties (default: the first of "
                     "--losses)")
    cmp.add_argument("--aa", default="", metavar="LOSS", help="A/A control: train LOSS again as LOSS-aa with other "
                     "sampling and rescue draws (same seeds, initial models, prompt orders) and print its paired "
                     "difference as the noise floor")
    cmp.add_argument("--no-train", action="store_true", help="only aggregate the runs already done under --out; "
                     "the missing ones are left out and named")
    cmp.add_argument("--jobs", type=int, default=1, help="runs trained at once, each with an equal share of the "
                     "cores as its threads unless OMP_NUM_THREADS is set (default: %(default)s); runs of one seed "
                     "share one warm start, made by whichever starts first")
    cmp.set_defaults(func=cmd_compare)

    plan = sub.add_parser("plan", help="per-GPU memory of a layout on a cluster; does it fit?")
    add_config_args(plan, None)
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: %(default)s)")
    plan.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GiB per GPU (default: %(default)s, H100)")
    plan.add_argument("--model-config", default="", help="config.json to plan for (default: model.hf_path's)")
    plan.set_defaults(func=cmd_plan)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    _quiet_third_party()
    parser = build_parser()
    # Overrides may come before and after options: collect the key=value leftovers argparse did not place.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from nsr_megatron.trainer.checkpoint import CheckpointError

    try:
        return int(args.func(args))
    except ConfigError as e:  # a user mistake, found before any work: one line, no traceback
        if _rank() == 0:
            print(f"nsr-megatron: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        if _rank() == 0:
            print(f"nsr-megatron: checkpoint error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
