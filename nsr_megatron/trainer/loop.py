"""The RL loop: rollout -> rewards -> advantages -> old/ref log-probs -> train -> weight sync -> log -> save.

One RL step, top to bottom, reads like the algorithm (GRPO / DAPO with any loss of ``nsr_megatron.losses``).
The driver rank (rank 0) generates and scores; every rank receives the step's samples and trains on its
data-parallel share; weight sync gathers the new weights group-locally onto the driver for its engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nsr_megatron.evaluation import generate_and_score
from nsr_megatron.losses import global_sums, loss_denominators, summarize_metrics
from nsr_megatron.losses.rng import mix64_int
from nsr_megatron.rollout.engine import RolloutError, SamplingParams
from nsr_megatron.telemetry.status import PhaseTimer
from nsr_megatron.trainer import actor
from nsr_megatron.trainer.advantages import group_advantages, informative_groups
from nsr_megatron.trainer.experience import Sample, dp_shard, mini_batches, pack_micro_batches
from nsr_megatron.trainer.runtime import Runtime, lr_at

log = logging.getLogger(__name__)

__all__ = ["rl_step", "sample_batch", "train"]

# The loss statistics of a step that trained nothing (written as null).
_NOT_TRAINED = dict.fromkeys(("loss", "grad_norm", "clip_frac", "clip_frac/upper", "clip_frac/lower", "rescue_frac",
                              "entropy", "kl_old"))


def train(config: Any, *, world_size: int = 1, progress: bool | None = None, annotate: bool = False) -> Runtime:
    """Check every input, then run ``config.run.steps`` RL steps (resuming when asked), logging, checkpointing
    and plotting. Raises ``ConfigError`` before any process group exists when an input is wrong. ``annotate``
    marks each phase as a named profiler range (``nsr-megatron profile``)."""
    from nsr_megatron.telemetry import MetricsWriter, ProgressBar, plot_run
    from nsr_megatron.trainer.checkpoint import save_checkpoint
    from nsr_megatron.trainer.preflight import preflight
    from nsr_megatron.trainer.runtime import build_runtime

    inputs = preflight(config, world_size=world_size)
    rt = build_runtime(config, inputs, world_size=world_size)
    run, ckpt, cfg_eval = config.run, config.checkpoint, config.eval
    writer = MetricsWriter(rt.run_dir, resume_step=rt.start_step if rt.resumed else None,
                           overwrite=not rt.resumed) if rt.is_logger else None
    bar = ProgressBar(run.steps, initial_step=rt.start_step, rank=rt.state.rank, enabled=progress, log_every=10)
    phases = PhaseTimer(rt.run_dir, write_status=rt.is_logger, annotate=annotate)
    try:
        if rt.colocated and rt.engine is not None:  # engines sharing the training devices start released
            rt.engine.release_memory()
        sync_weights(rt, rt.start_step)  # the engine starts from the policy's (possibly resumed) weights
        if cfg_eval.interval and cfg_eval.at_start and not rt.resumed:
            with phases("eval"), engines_generating(rt, phases, release=["kv_cache"]):
                start = evaluate_in_loop(rt, 0)
            if rt.is_logger:
                _write_json(rt.run_dir / "eval_start.json", {k.removeprefix("eval/"): v for k, v in start.items()})
        for step in range(rt.start_step, run.steps):
            phases.start_step(step + 1)
            metrics = {"step": step + 1, **rl_step(rt, step, phases)}
            if cfg_eval.interval and (step + 1) % cfg_eval.interval == 0:
                began = time.perf_counter()
                with phases("eval"), engines_generating(rt, phases, release=["kv_cache"]):
                    metrics.update(evaluate_in_loop(rt, step + 1))
                metrics["timing/eval"] = time.perf_counter() - began
            if writer is not None:
                writer.log(step + 1, metrics)
            bar.update(step + 1, metrics)
            if (ckpt.save_interval and (step + 1) % ckpt.save_interval == 0) or step + 1 == run.steps:
                with phases("checkpoint"):
                    save_checkpoint(rt.run_dir / "checkpoints", step + 1, rt.policy.module, rt.policy.optimizer,
                                    meta={"step": step + 1, "sampler": _sampler_to_save(rt),
                                          "counters": rt.counters},
                                    arch=dataclasses.asdict(rt.arch), keep_last=ckpt.keep_last)
        phases.mark("done")
    finally:
        bar.close()
        rt.close()
        if writer is not None:
            writer.close()
    if writer is not None:
        plot_run(rt.run_dir)
        if rt.routing_log is not None:
            from nsr_megatron.telemetry.routing_plots import plot_routing

            plot_routing(rt.run_dir)
    return rt


@dataclasses.dataclass
class StepSamples:
    """What one rank trains on in a step: its data-parallel share of the step's samples."""

    mine: list[Sample]  # this rank's share (round-robin over data-parallel ranks)
    total: int  # samples over every data-parallel rank
    seq_len: int  # the longest prompt + response among all of them (every rank pads to it)


def sample_batch(rt: Runtime, step: int, phases: PhaseTimer) -> tuple[StepSamples, dict[str, float], dict[str, Any]]:
    """Generate G responses per prompt, score them, compute group advantages (DAPO dynamic sampling
    optional: keep only groups with differing rewards, sample more prompts, at most N rounds).

    The driver rank does the work; every rank gets the step's metrics (and the data sampler's position) and its
    own data-parallel share of the samples, not the whole batch. While it works, the driver may ask the others to
    export the weights for an engine it restarted (``resync``). Returns the rank's samples, the step's rollout
    metrics, and one scored example (for messages)."""
    dp_size = rt.state.dp_size
    shares: list[list[Sample]] | None = None
    if rt.engine is not None:
        prefetched = _take_prefetch(rt, step, phases)
        samples, stats, example = prefetched if prefetched is not None else _sample_on_driver(rt, step, phases)
        if rt.config.rollout.overlap:  # weight updates between the samples' weights and the trained ones
            stats.setdefault("rollout/staleness", 0.0)
        shares = [dp_shard(samples, d, dp_size) for d in range(dp_size)]
        seq_len = max((len(s.prompt_ids) + len(s.response_ids) for s in samples), default=0)
        header = (stats, example, rt.sampler.state_dict(), len(samples), seq_len)
        _announce(("done", header))
    else:
        while (message := _announce(None))[0] == "resync":
            for _ in rt.export.tensors():  # the driver pushes the current weights to a restarted engine (disk)
                pass
        header = message[1]
    stats, example, sampler, total, seq_len = header
    rt.sampler.load_state_dict(sampler)
    return StepSamples(mine=_hand_out(rt, shares), total=total, seq_len=seq_len), stats, example


@dataclasses.dataclass
class Prefetch:
    """``rollout.overlap``: step ``step``'s samples, sampled by the driver in a background thread from the weights
    the engine holds while the step before trains (one update stale when they are used)."""

    step: int
    sampler_before: dict[str, Any]  # the data sampler before this prefetch drew its prompts (what a checkpoint keeps)
    timer: PhaseTimer  # the background's own rollout / rewards timings
    thread: threading.Thread = dataclasses.field(default_factory=threading.Thread)
    result: tuple[list[Sample], dict[str, float], dict[str, Any]] | None = None
    error: BaseException | None = None
    stale: bool = False  # the policy was updated (and synced) after the samples were drawn


class _PrefetchAborted(Exception):
    """An engine restart needs every rank (they export the weights again): not possible from the background."""


def _start_prefetch(rt: Runtime, step: int) -> None:
    """On the driver with ``rollout.overlap``: start sampling step ``step`` in the background (nothing past the
    run's last step). Only the driver's engine and reward workers are used: no collective runs in the thread."""
    if not rt.config.rollout.overlap or rt.engine is None or step >= rt.config.run.steps:
        return
    job = Prefetch(step=step, sampler_before=rt.sampler.state_dict(),
                   timer=PhaseTimer(rt.run_dir, write_status=False))

    def abort(engines: list[int]) -> None:  # they stay stale: the foreground rollout resyncs them
        raise _PrefetchAborted(f"engines {engines} were restarted")

    def work() -> None:
        try:
            job.result = _sample_on_driver(rt, step, job.timer, resync=abort)
        except _PrefetchAborted as exc:
            log.warning("step %d: the background rollout stopped (%s); the step samples again on-policy.",
                        step + 1, exc)
        except BaseException as exc:  # re-raised in the main thread when the step takes the samples
            job.error = exc

    job.thread = threading.Thread(target=work, name=f"nsr-prefetch-{step + 1}", daemon=True)
    rt.prefetch = job
    job.thread.start()


def _finish_prefetch(rt: Runtime) -> None:
    """Wait for the background rollout (before the engine's weights change or it serves anything else)."""
    if rt.prefetch is not None:
        rt.prefetch.thread.join()


def _take_prefetch(rt: Runtime, step: int, phases: PhaseTimer
                   ) -> tuple[list[Sample], dict[str, float], dict[str, Any]] | None:
    """Step ``step``'s prefetched samples (None when there are none: the step samples on-policy, from the data
    sampler's position before the background drew anything)."""
    job, rt.prefetch = rt.prefetch, None
    if job is None:
        return None
    with phases("rollout"):  # the time the step waited for the background
        job.thread.join()
    if job.error is not None:
        raise job.error
    if job.step != step or job.result is None:
        rt.sampler.load_state_dict(job.sampler_before)
        return None
    samples, stats, example = job.result
    stats["rollout/staleness"] = float(job.stale)
    for key, seconds in job.timer.seconds.items():
        stats[f"timing/{key}_background"] = seconds
    return samples, stats, example


def _sampler_to_save(rt: Runtime) -> dict[str, Any]:
    """The data sampler's position after the last trained step: a pending prefetch's prompts are not consumed
    (a resumed run samples that step again, on-policy)."""
    return rt.prefetch.sampler_before if rt.prefetch is not None else rt.sampler.state_dict()


def _hand_out(rt: Runtime, shares: list[list[Sample]] | None) -> list[Sample]:
    """Each rank's share of the driver's ``shares`` (indexed by data-parallel rank): one scatter from the driver,
    so no rank receives the samples of another data-parallel rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        assert shares is not None
        return shares[0]
    if rt.dp_ranks is None:  # each world rank's data-parallel rank, once
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rt.state.dp_rank)
        rt.dp_ranks = [int(r) for r in ranks]
    box: list[Any] = [None]
    dist.scatter_object_list(box, [shares[d] for d in rt.dp_ranks] if shares is not None else None, src=0)
    return list(box[0])


def evaluate_in_loop(rt: Runtime, step: int) -> dict[str, float]:
    """``eval/*`` metrics of the engine's current weights (the driver samples and scores; every rank returns the
    same dict). Problem i's draws depend on (eval.seed, i) only, so the schedule and values survive a resume."""
    from nsr_megatron.evaluation import problem_results, summarize
    from nsr_megatron.rollout.engine import prompt_seeds

    ev = rt.config.eval
    out: dict[str, float] = {}
    _finish_prefetch(rt)
    if rt.engine is not None and rt.scorer is not None and rt.eval_dataset is not None:
        data = rt.eval_dataset
        params = SamplingParams(max_new_tokens=ev.max_new_tokens or rt.config.rollout.max_new_tokens,
                                temperature=ev.temperature, top_p=ev.top_p, top_k=rt.config.rollout.top_k,
                                stop_token_ids=rt.stop_token_ids)
        records = [data[i] for i in range(len(data))]
        gens, rewards, _, texts = generate_and_score(rt.engine, rt.scorer, rt.tokenizer, records, params, n=ev.k,
                                                     seeds=prompt_seeds(ev.seed, len(records)))
        summary = summarize(problem_results(records, gens, rewards, texts, ev.k, ev.correct_threshold), ev.k)
        keys = [f"avg@{ev.k}", "pass@1", f"pass@{ev.k}", f"maj@{ev.k}", "mean_response_tokens"]
        out = {f"eval/{k}": summary[k] for k in keys}
        log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return dict(_announce(out))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _announce(message: Any) -> Any:
    """The driver's ``message`` on every rank (the driver passes it, the others pass None)."""
    box = [message]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _resync(rt: Runtime, step: int, engines: list[int]) -> None:
    """On the driver, when the engine restarted replicas ``engines`` (or they missed an update): every rank
    exports the current weights again and the driver pushes them to those replicas only."""
    assert rt.engine is not None, "only the driver resyncs"
    _announce(("resync", None))
    rt.engine.update_weights(rt.export.tensors(), version=str(step), engines=engines)


def _sample_on_driver(rt: Runtime, step: int, phases: PhaseTimer,
                      resync: Callable[[list[int]], None] | None = None,
                      ) -> tuple[list[Sample], dict[str, float], dict[str, Any]]:
    engine = rt.engine
    assert engine is not None and rt.scorer is not None
    cfg, G = rt.config, rt.config.rollout.samples_per_prompt
    with phases("rollout"):  # restart what died, resync what missed the current weights
        engine.ensure_healthy(resync or (lambda engines: _resync(rt, step, engines)))
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop_token_ids=rt.stop_token_ids)
    groups: list[tuple[Any, list[Any], torch.Tensor]] = []
    all_rewards: list[float] = []
    lengths: list[int] = []
    stats = dict.fromkeys(("reward/errors", "reward/invalid", "reward/worker_crashes", "reward/timeouts",
                           "rollout/rounds", "rollout/dropped_groups"), 0.0)
    example: dict[str, Any] = {}
    draws = cfg.rollout.sampling_seed
    assert draws is not None, "Config.__post_init__ sets rollout.sampling_seed (default: run.seed)"
    for round_ in range(cfg.algorithm.max_sampling_rounds if cfg.algorithm.dynamic_sampling else 1):
        records = [rt.dataset[i] for i in rt.sampler.next_batch()]
        gens, rewards, rstats, texts = generate_and_score(
            engine, rt.scorer, rt.tokenizer, records, params, n=G, phases=phases,
            seed=mix64_int(draws * 1_000_003 + step * 131 + round_) >> 1,
            return_routed_experts=rt.routed_experts)
        flat = [g for per_prompt in gens for g in per_prompt]
        answers = [r.answer for r in records for _ in range(G)]
        for key, value in rstats.as_metrics().items():
            stats[key] += value
        stats["rollout/rounds"] += 1
        all_rewards += rewards
        lengths += [len(g.response_ids) for g in flat]
        example = example or {"prompt": records[0].prompt, "response": texts[0], "answer": answers[0],
                              "reward": rewards[0]}
        r = torch.tensor(rewards, dtype=torch.float32).view(len(records), G)  # [N, G]
        keep = informative_groups(r) if cfg.algorithm.dynamic_sampling else torch.ones(len(records), dtype=torch.bool)
        stats["rollout/dropped_groups"] += float((~keep).sum())
        groups += [(records[i], gens[i], r[i]) for i in range(len(records)) if keep[i]]
        if len(groups) >= cfg.rollout.prompts_per_step:
            break
    groups = groups[: cfg.rollout.prompts_per_step]
    # (restarts in a background rollout that stopped count with the next step that samples)
    stats["rollout/restarts"] = float(engine.restarts - rt.restarts_seen)
    rt.restarts_seen = engine.restarts
    stats.update({
        "reward/mean": sum(all_rewards) / max(1, len(all_rewards)),
        "response_length/mean": sum(lengths) / max(1, len(lengths)),
        "rollout/kept_groups": float(len(groups)),
        # kept groups whose rewards are all equal: zero advantages, no learning signal
        "rollout/uniform_groups": float(sum(not bool(informative_groups(g[2][None])[0]) for g in groups)),
    })
    if not groups:
        return [], stats, example
    adv = group_advantages(torch.stack([g[2] for g in groups]), normalize_std=cfg.algorithm.normalize_std)
    samples = [
        Sample(uid=i * G + j, prompt_ids=gen.prompt_ids, response_ids=gen.response_ids,
               rollout_logprobs=gen.response_logprobs, reward=float(rew[j]), advantage=float(adv[i, j]),
               routed_experts=gen.routed_experts)
        for i, (_, gens_i, rew) in enumerate(groups) for j, gen in enumerate(gens_i)
    ]
    return samples, stats, example


def rl_step(rt: Runtime, step: int, phases: PhaseTimer) -> dict[str, float | None]:
    """One RL step; returns the step's global metrics (identical on every rank)."""
    cfg = rt.config
    with engines_generating(rt, phases):
        batch, metrics, example = sample_batch(rt, step, phases)
    _start_prefetch(rt, step + 1)  # rollout.overlap: the next step samples while this one trains
    _watch_learning_signal(rt, step, metrics, example)
    # Every data-parallel rank needs a sample for each optimizer step, or the ranks would disagree on the steps.
    steps_here = min(cfg.algorithm.mini_batches, batch.total // rt.state.dp_size)
    if steps_here == 0:
        rt.counters["rollout/empty_steps"] += 1
        log.warning("step %d trained nothing: %s. The run goes on (rollout/empty_steps=%d).", step + 1,
                    f"dynamic sampling kept no group in {int(metrics['rollout/rounds'])} rounds" if not batch.total
                    else f"{batch.total} samples cannot feed {rt.state.dp_size} data-parallel ranks",
                    rt.counters["rollout/empty_steps"])
        return {**metrics, **_NOT_TRAINED, **_counters(rt), **phases.timings()}
    mine = batch.mine
    pack: dict[str, Any] = dict(max_tokens=cfg.algorithm.max_tokens_per_micro_batch, pad_id=_pad_id(rt),
                seq_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1, seq_len=batch.seq_len,
                uniform_rows=cfg.parallel.pp > 1)  # the pipeline schedule sends one activation shape
    # Old (and reference) log-probs of every sample come from the weights that generated them: all of
    # them are computed before the first optimizer step of this RL step.
    shortcut = on_policy_shortcut(rt, steps_here)
    with phases("logprobs"):
        batches = [pack_micro_batches(mini, **pack) for mini in mini_batches(mine, steps_here)]
        for k, micro in enumerate(batches):
            for j, mb in enumerate(micro):
                mb["mb_key"] = torch.tensor(k * 1_000_000 + j)  # names the micro-batch for the routing profiler
            _attach_logprobs(rt, micro, old=not shortcut)
    sums: list[dict[str, torch.Tensor]] = []
    grad_norms: list[float] = []
    lr = 0.0
    profiler = rt.policy.routing
    masks: dict[int, dict[str, torch.Tensor]] | None = {} if profiler is not None and profiler.full else None
    with phases("train"):
        for k, micro in enumerate(batches):
            den = global_sums([loss_denominators(cfg.loss, mb["mask"], old_logprobs=mb.get("old_logprobs"),
                                                 rollout_logprobs=mb["rollout_logprobs"]) for mb in micro],
                              [actor.data_parallel_group()])
            loss_fn = actor.policy_loss_fn(cfg.loss, step=step, temperature=cfg.rollout.temperature,
                                           global_num_tokens=den["tokens"], global_num_seqs=den["seqs"],
                                           scale=float(len(micro) * rt.state.dp_size), masks_out=masks,
                                           old_from_current=shortcut)
            opt_step = step * cfg.algorithm.mini_batches + k
            lr = lr_at(opt_step, lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr, warmup=cfg.optimizer.warmup_steps,
                       total=cfg.run.steps * cfg.algorithm.mini_batches, schedule=cfg.optimizer.lr_schedule)
            step_sums, grad_norm = actor.train_step(rt.policy, micro, loss_fn, lr=lr)
            if grad_norm is None:
                rt.counters["train/skipped_steps"] += 1
                log.warning("step %d, optimizer step %d: a loss, log-prob or gradient is NaN or inf; the update was "
                            "skipped (weights and optimizer state unchanged; train/skipped_steps=%d).",
                            step + 1, k + 1, rt.counters["train/skipped_steps"])
                continue
            sums += step_sums
            grad_norms.append(grad_norm)
    if grad_norms:  # the weights changed: the engine samples the next step from the new ones
        with phases("weight_sync"):
            _finish_prefetch(rt)  # (with rollout.overlap, the next step's samples came from the old ones)
            if rt.prefetch is not None:
                rt.prefetch.stale = True
            sync_weights(rt, step + 1)
    routing = _routing_step(rt, step, batches, masks) if profiler is not None else {}
    if rt.policy.replay is not None:
        rt.policy.replay.clear()
    reduced = actor.reduce_stats(sums)
    loss_stats: dict[str, float | None] = {**_NOT_TRAINED, **summarize_metrics(reduced)} if grad_norms else dict(
        _NOT_TRAINED)
    if grad_norms:
        loss_stats["loss"] = reduced.get("loss_sum", 0.0) / len(grad_norms)  # mean over optimizer steps
        loss_stats["grad_norm"] = max(grad_norms)
    return {**metrics, **loss_stats, "lr": lr, **routing, **_counters(rt), **phases.timings()}


def _routing_step(rt: Runtime, step: int, batches: list[list[dict[str, torch.Tensor]]],
                  masks: dict[int, dict[str, torch.Tensor]] | None) -> dict[str, float]:
    """The step's routing statistics (every rank takes part); in ``full`` mode also a line of routing.jsonl."""
    from nsr_megatron.telemetry.routing import routing_metrics

    profiler = rt.policy.routing
    if masks is not None:
        shapes = {int(mb["mb_key"]): (int(mb["tokens"].shape[0]), int(mb["tokens"].shape[1]))
                  for micro in batches for mb in micro}
        profiler.attribute(actor.from_last_stage(masks), shapes)
    sums = profiler.step_sums()
    if masks is not None and rt.routing_log is not None:
        rt.routing_log.log(step + 1, sums)
    return routing_metrics(sums)


def _counters(rt: Runtime) -> dict[str, float]:
    return {k: v for k, v in rt.counters.items() if "/" in k}


def _watch_learning_signal(rt: Runtime, step: int, metrics: dict[str, float], example: dict[str, Any]) -> None:
    """Count steps in a row whose kept groups all had equal rewards (zero advantages everywhere); warn every
    ``run.warn_no_signal_steps`` of them with the likely causes."""
    signal = metrics["rollout/kept_groups"] > metrics["rollout/uniform_groups"]
    rt.counters["no_signal_streak"] = 0.0 if signal else rt.counters["no_signal_streak"] + 1
    streak, every = int(rt.counters["no_signal_streak"]), rt.config.run.warn_no_signal_steps
    if not every or not streak or streak % every:
        return
    cfg = rt.config
    log.warning(
        "no learning signal for %d steps in a row (steps %d-%d): every group of %d samples got equal rewards (mean "
        "reward %.3f), so every advantage is 0. Likely causes: the reward (reward.name=%r) does not accept the "
        "responses' format; the answers (data.answer_key=%r) are not what it compares against; or the prompt "
        "template does not ask for the format the reward parses. Example: prompt %r -> response %r, answer %r, "
        "reward %s.", streak, step + 2 - streak, step + 1, cfg.rollout.samples_per_prompt, metrics["reward/mean"],
        cfg.reward.name, cfg.data.answer_key, example.get("prompt", "")[-120:], example.get("response", "")[:120],
        example.get("answer"), example.get("reward"))


def _pad_id(rt: Runtime) -> int:
    tok = rt.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)


def on_policy_shortcut(rt: Runtime, optimizer_steps: int) -> bool:
    """Whether this step's old log-probs are taken from the training forward itself (``algorithm.on_policy_shortcut``).

    With one optimizer step per rollout batch and recomputed old log-probs, the old policy is the weights being
    trained, so ``old = sg(logp)`` of the training forward: the same numbers without a second forward. Not with
    TIS/MIS (their mask enters the loss's denominators before the step), R2 routing replay (it replays the old
    forward's routing) or the routing profiler (it measures the drift between the two forwards).
    """
    cfg = rt.config
    return (cfg.algorithm.on_policy_shortcut and optimizer_steps == 1 and cfg.algorithm.old_logprobs == "recompute"
            and cfg.loss.tis_cap is None and cfg.loss.mis_low is None and cfg.loss.mis_high is None
            and cfg.algorithm.routing_replay != "R2" and rt.policy.routing is None)


def _attach_logprobs(rt: Runtime, micro: list[dict[str, torch.Tensor]], *, old: bool = True) -> None:
    """Old log-probs (recomputed by the trainer, or the rollout's; none with ``old=False``: the loss takes the
    training forward's own) and reference log-probs (KL on)."""
    temp = rt.config.rollout.temperature
    old_lp: list[torch.Tensor] | None = None
    if old and rt.config.algorithm.old_logprobs == "recompute":
        old_lp = actor.token_logprobs(rt.policy, micro, temperature=temp)
    elif old:
        old_lp = [mb["rollout_logprobs"] for mb in micro]
    ref = None
    if rt.reference is not None:
        with rt.reference.in_use():  # an offloaded reference comes back to the device for this forward only
            ref = actor.token_logprobs(rt.reference, micro, temperature=temp)
    for i, mb in enumerate(micro):
        if old:
            mb["old_logprobs"] = old_lp[i] if old_lp is not None else torch.zeros_like(mb["mask"])
        if ref is not None:
            mb["ref_logprobs"] = ref[i]


def sync_weights(rt: Runtime, version: int) -> None:
    """Push the policy's weights to the driver's rollout engine(s) as HF-named tensors, streamed (each tensor is
    gathered only from the ranks that hold it; every rank takes part), as weight version ``str(version)`` (the
    number of RL steps the weights have seen)."""
    if rt.weight_sync == "shared_memory":
        _sync_shared(rt, version)
        return
    named = rt.export.tensors()
    if rt.engine is None:
        for _ in named:  # this rank sends its shards to the driver
            pass
        return
    if rt.colocated:  # the KV cache comes back when the engines generate next (engines_generating)
        rt.engine.resume_memory(["weights"])
    try:
        rt.engine.update_weights(named, version=str(version))
    except RolloutError as exc:  # the engine repairs its replicas before the next rollout (ensure_healthy)
        log.warning("%s", exc)


def _sync_shared(rt: Runtime, version: int) -> None:
    """``rollout.weight_sync=shared_memory``: the driver opens an update on its engines and tells every rank where
    their weights sit; each rank writes its own shards there (nothing moves between ranks); the driver then sets
    the engines' version. A rank that cannot map the engines' memory stops the run on every rank, with the reason
    (with ``auto``, every rank switches to the distributed path instead)."""
    layouts = None
    if rt.engine is not None:
        try:
            layouts = rt.engine.open_shared_update()
        except RolloutError as exc:  # the engine repairs its replicas before the next rollout (ensure_healthy)
            log.warning("%s", exc)
    layouts = _announce(layouts)
    if layouts is None:
        return
    try:
        rt.export.write_into(rt.shared_weights.views(layouts))
        error = ""
    except RuntimeError as exc:
        error = f"rank {rt.state.rank}: {exc}"
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [""] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if rt.engine is not None:
        try:
            rt.engine.close_shared_update(str(version), written=not failed)
        except RolloutError as exc:
            if not failed:
                log.warning("%s", exc)
    if failed and rt.config.rollout.weight_sync == "auto":  # every rank saw the same errors: all switch
        log.warning("rollout.weight_sync=auto: the engines' shared memory cannot be used (%s); weights go over the "
                    "distributed path from now on.", failed[0])
        rt.weight_sync = "distributed"
        if rt.engine is not None:
            rt.engine.set_weight_sync("distributed")
        sync_weights(rt, version)
    elif failed:
        raise RuntimeError(failed[0])


@contextlib.contextmanager
def engines_generating(rt: Runtime, phases: PhaseTimer, release: list[str] | None = None) -> Iterator[None]:
    """The engines generate inside this block (every rank enters it).

    Engines that share the training devices (``rt.colocated``) take their KV cache back on entry and release
    ``release`` on exit (None: all their memory, before training; the weights come back for the next weight sync;
    an evaluation after the sync keeps the weights and releases the KV cache), so training has the devices to
    itself. With
    ``rollout.offload_train`` the training state (policy parameters, gradient buffers, optimizer state, the
    reference) waits in host memory meanwhile: every rank has freed it before any engine grows, and takes it
    back, bit for bit, only after every engine has shrunk."""
    off = rt.train_offload
    if off is not None:
        with phases("offload"):
            off.offload(rt.train_state())
        _barrier()
    if rt.colocated and rt.engine is not None:
        rt.engine.resume_memory(["kv_cache"])
    done = False
    try:
        yield
        done = True
    finally:
        if done and rt.colocated and rt.engine is not None:
            rt.engine.release_memory(release)
        if off is not None:
            if done:
                _barrier()
            with phases("offload"):
                off.onload()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

