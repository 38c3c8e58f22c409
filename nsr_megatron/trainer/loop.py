"""The RL loop: rollout -> rewards -> advantages -> old/ref log-probs -> train -> weight sync -> log -> save.

One RL step, top to bottom, reads like the algorithm (GRPO / DAPO with any loss of ``nsr_megatron.losses``).
Every rank runs the same rollout (same weights, same seed), then trains on its data-parallel share.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from nsr_megatron.losses import global_sums, loss_denominators, summarize_metrics
from nsr_megatron.losses.rng import mix64_int
from nsr_megatron.rollout import SamplingParams
from nsr_megatron.trainer import actor
from nsr_megatron.trainer.advantages import group_advantages, informative_groups
from nsr_megatron.trainer.experience import Sample, dp_shard, mini_batches, pack_micro_batches
from nsr_megatron.trainer.runtime import Runtime, lr_at

__all__ = ["rl_step", "sample_batch", "train"]


def train(config: Any, *, world_size: int = 1, progress: bool | None = None) -> Runtime:
    """Run ``config.run.steps`` RL steps (resuming when asked), logging, checkpointing and plotting."""
    from nsr_megatron.telemetry import MetricsWriter, ProgressBar, plot_run
    from nsr_megatron.trainer.checkpoint import save_checkpoint
    from nsr_megatron.trainer.runtime import build_runtime

    rt = build_runtime(config, world_size=world_size)
    run, ckpt = config.run, config.checkpoint
    resumed = rt.start_step > 0 or "resumed_meta" in rt.extra
    writer = MetricsWriter(rt.run_dir, resume_step=rt.start_step if resumed else None, overwrite=not resumed) if rt.is_logger else None
    bar = ProgressBar(run.steps, initial_step=rt.start_step, rank=rt.state.rank, enabled=progress, log_every=10)
    sync_weights(rt)  # the engine starts from the policy's (possibly resumed) weights
    for step in range(rt.start_step, run.steps):
        metrics = {"step": step + 1, **rl_step(rt, step)}
        if writer is not None:
            writer.log(step + 1, metrics)
        bar.update(step + 1, metrics)
        if (ckpt.save_interval and (step + 1) % ckpt.save_interval == 0) or step + 1 == run.steps:
            save_checkpoint(rt.run_dir / "checkpoints", step + 1, rt.policy.module, rt.policy.optimizer,
                            meta={"step": step + 1, "sampler": rt.sampler.state_dict()}, keep_last=ckpt.keep_last)
        _crash_for_testing(step + 1)
    bar.close()
    rt.scorer.close()
    if writer is not None:
        writer.close()
        plot_run(rt.run_dir)
    return rt


def _crash_for_testing(step: int) -> None:
    """``NSR_KILL_AFTER_STEP=N`` SIGKILLs this process's whole process group right after step N (and its
    checkpoint), as a scheduler killing a job would: the resume tests use it to prove that a killed run
    continues exactly. Start the run in its own session (``setsid``) when you use it."""
    import os
    import signal

    if os.environ.get("NSR_KILL_AFTER_STEP") == str(step):
        os.killpg(os.getpgid(0), signal.SIGKILL)


def sample_batch(rt: Runtime, step: int) -> tuple[list[Sample], dict[str, float]]:
    """Generate G responses per prompt, score them, compute group advantages (DAPO dynamic sampling
    optional: keep only groups with differing rewards, sample more prompts, at most N rounds)."""
    cfg, G = rt.config, rt.config.rollout.samples_per_prompt
    params = SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        stop_token_ids=(rt.tokenizer.eos_token_id,) if rt.tokenizer.eos_token_id is not None else (),
    )
    groups: list[tuple[Any, list[Any], torch.Tensor]] = []
    all_rewards: list[float] = []
    lengths: list[int] = []
    stats = {"reward/errors": 0.0, "reward/timeouts": 0.0, "rollout/rounds": 0.0, "timing/rewards": 0.0}
    for round_ in range(cfg.algorithm.max_sampling_rounds if cfg.algorithm.dynamic_sampling else 1):
        records = [rt.dataset[i] for i in rt.sampler.next_batch()]
        prompts = [rt.tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in records]
        gens = rt.engine.generate(prompts, params, n=G, seed=mix64_int(cfg.run.seed * 1_000_003 + step * 131 + round_) >> 1)
        flat = [g for per_prompt in gens for g in per_prompt]
        texts = [rt.tokenizer.decode(g.response_ids, skip_special_tokens=False) for g in flat]
        answers = [r.answer for r in records for _ in range(G)]
        t_reward = time.perf_counter()
        rewards, rstats = rt.scorer.score_batch(texts, answers, [len(g.response_ids) for g in flat])
        stats["timing/rewards"] = stats.get("timing/rewards", 0.0) + time.perf_counter() - t_reward
        stats["reward/errors"] += rstats.errors
        stats["reward/timeouts"] += rstats.timeouts
        stats["rollout/rounds"] += 1
        all_rewards += rewards
        lengths += [len(g.response_ids) for g in flat]
        r = torch.tensor(rewards, dtype=torch.float32).view(len(records), G)  # [N, G]
        keep = informative_groups(r) if cfg.algorithm.dynamic_sampling else torch.ones(len(records), dtype=torch.bool)
        groups += [(records[i], gens[i], r[i]) for i in range(len(records)) if keep[i]]
        if len(groups) >= cfg.rollout.prompts_per_step:
            break
    groups = groups[: cfg.rollout.prompts_per_step]
    stats.update({
        "reward/mean": sum(all_rewards) / max(1, len(all_rewards)),
        "response_length/mean": sum(lengths) / max(1, len(lengths)),
        "rollout/kept_groups": float(len(groups)),
    })
    if not groups:
        return [], stats
    adv = group_advantages(torch.stack([g[2] for g in groups]), normalize_std=cfg.algorithm.normalize_std)
    samples = [
        Sample(uid=i * G + j, prompt_ids=gen.prompt_ids, response_ids=gen.response_ids,
               rollout_logprobs=gen.response_logprobs, reward=float(rew[j]), advantage=float(adv[i, j]))
        for i, (_, gens_i, rew) in enumerate(groups) for j, gen in enumerate(gens_i)
    ]
    return samples, stats


def rl_step(rt: Runtime, step: int) -> dict[str, float]:
    """One RL step; returns the step's global metrics (identical on every rank)."""
    from megatron.core import parallel_state as mpu

    cfg, timing = rt.config, {}
    t0 = time.perf_counter()
    samples, metrics = sample_batch(rt, step)
    timing["timing/rollout"] = time.perf_counter() - t0 - metrics["timing/rewards"]  # generation only
    mine = dp_shard(samples, rt.state.dp_rank, rt.state.dp_size)
    dp_group = mpu.get_data_parallel_group()
    sums: list[dict[str, torch.Tensor]] = []
    grad_norms: list[float] = []
    pack = dict(max_tokens=cfg.algorithm.max_tokens_per_micro_batch, pad_id=_pad_id(rt),
                seq_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1,
                seq_len=max((len(s.prompt_ids) + len(s.response_ids) for s in samples), default=2))
    # Old (and reference) log-probs of every sample come from the weights that generated them: all of
    # them are computed before the first optimizer step of this RL step.
    t1 = time.perf_counter()
    batches = [pack_micro_batches(mini, **pack) for mini in mini_batches(mine, cfg.algorithm.mini_batches)] if samples else []
    for micro in batches:
        _attach_logprobs(rt, micro)
    timing["timing/logprobs"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    for k, micro in enumerate(batches):
        den = global_sums([loss_denominators(cfg.loss, mb["mask"], old_logprobs=mb["old_logprobs"],
                                             rollout_logprobs=mb["rollout_logprobs"]) for mb in micro], [dp_group])
        loss_fn = actor.policy_loss_fn(cfg.loss, step=step, temperature=cfg.rollout.temperature,
                                       global_num_tokens=den["tokens"], global_num_seqs=den["seqs"],
                                       scale=float(len(micro) * rt.state.dp_size))
        actor.zero_grads(rt.policy)
        sums += actor.forward_backward(rt.policy, micro, loss_fn)
        opt_step = step * cfg.algorithm.mini_batches + k
        lr = lr_at(opt_step, lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr, warmup=cfg.optimizer.warmup_steps,
                   total=cfg.run.steps * cfg.algorithm.mini_batches, schedule=cfg.optimizer.lr_schedule)
        grad_norms.append(actor.optimizer_step(rt.policy, lr=lr)["grad_norm"])
    timing["timing/train"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    sync_weights(rt)
    timing["timing/weight_sync"] = time.perf_counter() - t3
    reduced = _reduce_to_all(sums)
    loss_stats = summarize_metrics(reduced)
    loss_stats["loss"] = reduced.get("loss_sum", 0.0) / max(1, len(grad_norms))  # mean over optimizer steps
    timing["timing/step"] = time.perf_counter() - t0
    return {**metrics, **loss_stats, "grad_norm": max(grad_norms, default=0.0), "lr": lr if grad_norms else 0.0,
            **timing}


def _pad_id(rt: Runtime) -> int:
    return int(rt.tokenizer.pad_token_id if rt.tokenizer.pad_token_id is not None else rt.tokenizer.eos_token_id)


def _attach_logprobs(rt: Runtime, micro: list[dict[str, torch.Tensor]]) -> None:
    """Old log-probs (recomputed by the trainer, or the rollout's) and reference log-probs (KL on)."""
    temp = rt.config.rollout.temperature
    if rt.config.algorithm.old_logprobs == "recompute":
        old = actor.token_logprobs(rt.policy, micro, temperature=temp)
    else:
        old = [mb["rollout_logprobs"] for mb in micro]
    ref = actor.token_logprobs(rt.reference, micro, temperature=temp) if rt.reference is not None else None
    for i, mb in enumerate(micro):
        mb["old_logprobs"] = old[i] if old is not None else torch.zeros_like(mb["mask"])
        if ref is not None:
            mb["ref_logprobs"] = ref[i]


def _reduce_to_all(per_micro: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum the loss statistics over micro-batches and data-parallel ranks; every rank gets the result.

    Only last-pipeline-stage, tensor-rank-0 processes hold statistics (the loss runs there, identically
    on each TP rank), so the others contribute nothing.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    local: dict[str, float] = {}
    if mpu.is_pipeline_last_stage() and mpu.get_tensor_model_parallel_rank() == 0:
        for d in per_micro:
            for k, v in d.items():
                local[k] = local.get(k, 0.0) + float(v)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    total: dict[str, float] = {}
    for d in gathered:
        for k, v in d.items():
            total[k] = total.get(k, 0.0) + v
    return total


def sync_weights(rt: Runtime) -> None:
    """Push the policy's weights to the rollout engine through the HF mapping (the path SGLang uses)."""
    from nsr_megatron.convert.mapping import canonical_to_hf_state
    from nsr_megatron.models.state import canonical_state

    rt.engine.update_weights(canonical_to_hf_state(rt.arch, canonical_state(rt.policy.module)))
