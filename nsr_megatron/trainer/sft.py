"""``nsr-megatron sft``: supervised fine-tuning of the policy on prompt / response pairs, the cold start before RL.

It runs on the same megatron-core models, layouts (TP, PP, EP, SP), optimizer options, checkpoints, metrics and
resume as ``train``: a checkpoint of ``run.run_dir/checkpoints/step_N`` is what ``train`` starts from
(``checkpoint.load``) and what ``eval --model`` reads; ``sft.save_hf`` also writes an HF folder.

One step: ``sft.batch_size`` examples (the sampler's next batch, shuffled per epoch from ``run.seed`` and
``data.seed``) are split round-robin over the data-parallel ranks; each rank packs its share into micro-batches of
at most ``sft.max_tokens_per_micro_batch`` padded tokens. The loss is the negative log-likelihood of the response
tokens only (the stop token included), averaged over every response token of the step on all ranks: each token
weighs the same, whichever example and rank it is on.

Held-out (``sft.eval_data``, every ``sft.eval_interval`` steps and at the end): the mean NLL per response token
(``eval/loss``), next-token accuracy under teacher forcing (``eval/token_accuracy``) and the share of examples whose
every response token is the argmax (``eval/exact_match``). No held-out prompt may occur in the training set.

Legend: B rows of a micro-batch, S padded length, T = S - 1 target positions, V/tp this rank's vocabulary slice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nsr_megatron.config import (
    CheckpointConfig,
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
)
from nsr_megatron.data.datasets import DataConfig, EpochSampler
from nsr_megatron.data.sft import SFTExample, load_sft_examples, prompt_overlap
from nsr_megatron.trainer.experience import Sample, dp_shard, pack_micro_batches

log = logging.getLogger(__name__)

__all__ = ["SFTConfig", "SFTRunConfig", "sft"]


@dataclass(kw_only=True)
class SFTConfig:
    """The ``sft`` section.

    Attributes:
        eval_data: held-out pairs (same format as ``data.path``); empty: no held-out evaluation.
        response_key: key path of the response in ``{"prompt", "response"}`` records.
        messages_key: key of chat messages ending with the assistant's answer (used when a record has no
            ``data.prompt_key``).
        batch_size: examples per optimizer step, over all data-parallel ranks (at least the data-parallel size).
        max_tokens_per_micro_batch: padded tokens per micro-batch (an example longer than that gets its own).
        max_seq_len: skip examples longer than this many tokens (prompt + response + stop); 0: keep all.
        eval_interval: evaluate every N steps (and after the last); 0: after the last step only.
        eval_max_examples: evaluate the first N held-out examples; 0: all.
        save_hf: also write the final weights as an HF folder, ``run.run_dir/hf``.
    """

    eval_data: str = ""
    response_key: str = "response"
    messages_key: str = "messages"
    batch_size: int = 32
    max_tokens_per_micro_batch: int = 4096
    max_seq_len: int = 0
    eval_interval: int = 0
    eval_max_examples: int = 0
    save_hf: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_tokens_per_micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"sft.{name}={getattr(self, name)} must be >= 1.")
        for name in ("max_seq_len", "eval_interval", "eval_max_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"sft.{name}={getattr(self, name)} must be >= 0 (0: {'no limit' if name != 'eval_interval' else 'at the end only'}).")


def _sft_data() -> DataConfig:
    return DataConfig(apply_chat_template=True)


def _sft_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-5)


@dataclass(kw_only=True)
class SFTRunConfig:
    """``nsr-megatron sft --config F``: the model, its layout and optimizer, the run, the data and ``sft``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=_sft_optimizer)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=_sft_data)
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass(kw_only=True)
class SFTInputs:
    arch: Any
    tokenizer: Any
    train: list[SFTExample]
    held_out: list[SFTExample]
    resume_from: Path | None
    stop_id: int | None


def sft_preflight(config: SFTRunConfig, *, world_size: int) -> SFTInputs:
    """Check the model, layout, optimizer, data and checkpoints before any process group exists; raise
    :class:`ConfigError` with one line at the first problem."""
    from nsr_megatron.config import read_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf, validate_layout
    from nsr_megatron.trainer import preflight as pf

    hf_dir = pf._model_dir(config.model)
    arch = arch_from_hf(read_hf_config(hf_dir))
    validate_layout(arch, config.model, config.parallel, world_size)
    pf._check_optimizer(config)  # type: ignore[arg-type]
    resume_from = pf._resume_point(config, arch)  # type: ignore[arg-type]
    if config.checkpoint.load:
        pf._check_checkpoint(Path(config.checkpoint.load), arch, setting="checkpoint.load")
    pf._check_weights(config, hf_dir, arch, needed=not config.checkpoint.load and resume_from is None)  # type: ignore[arg-type]
    tokenizer = pf.load_tokenizer(config.model, arch)
    stops = pf.stop_token_ids(hf_dir, tokenizer, arch.vocab_size)
    stop_id = stops[0] if stops else None
    s = config.sft
    kw: dict[str, Any] = dict(response_key=s.response_key, messages_key=s.messages_key, stop_id=stop_id,
                              max_tokens=s.max_seq_len)
    if not config.data.path:
        raise ConfigError("data.path is empty: set it to a .jsonl or .parquet file of prompt / response pairs.")
    try:
        train = load_sft_examples(config.data.path, config.data, tokenizer, **kw)
        held_out: list[SFTExample] = []
        if s.eval_data:
            held_cfg = dataclasses.replace(config.data, max_samples=s.eval_max_examples or None)
            held_out = load_sft_examples(s.eval_data, held_cfg, tokenizer, setting="sft.eval_data", **kw)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    overlap = prompt_overlap([e.prompt for e in train], [e.prompt for e in held_out])
    if overlap:
        raise ConfigError(f"sft.eval_data={s.eval_data!r}: {len(overlap)} of its {len(held_out)} prompts also occur "
                          f"in data.path (first: {overlap[0]!r:.120}); a held-out set shares no item with training. "
                          f"Make it from another seed or remove those prompts.")
    dp = world_size // (config.parallel.tp * config.parallel.pp * config.parallel.cp)
    if s.batch_size < dp:
        raise ConfigError(f"sft.batch_size={s.batch_size} is smaller than the data-parallel size {dp}; every "
                          f"data-parallel rank needs an example per step: set sft.batch_size >= {dp}.")
    if s.batch_size > len(train):
        raise ConfigError(f"sft.batch_size={s.batch_size} is larger than the {len(train)} training examples of "
                          f"data.path; lower sft.batch_size.")
    return SFTInputs(arch=arch, tokenizer=tokenizer, train=train, held_out=held_out, resume_from=resume_from,
                     stop_id=stop_id)


def _samples(examples: list[SFTExample]) -> list[Sample]:
    return [Sample(uid=e.uid, prompt_ids=list(e.prompt_ids), response_ids=list(e.response_ids),
                   rollout_logprobs=[0.0] * len(e.response_ids), reward=0.0, advantage=1.0) for e in examples]


def _pack(samples: list[Sample], *, max_tokens: int, pad_id: int, seq_multiple: int) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of at most ``max_tokens`` padded tokens, all of one [B, S] shape (the pipeline schedule sends
    one activation shape between stages; rows of padding carry no loss)."""
    return pack_micro_batches(samples, max_tokens=max_tokens, pad_id=pad_id, seq_multiple=seq_multiple,
                              uniform_rows=True)


def nll_loss_fn(*, global_tokens: float, scale: float) -> Any:
    """Sum of response-token NLL / ``global_tokens`` on one micro-batch, times ``scale`` (= micro-batches x
    data-parallel size, undoing megatron's mean over micro-batches and DDP's over ranks): the gradient is that of
    the step's mean NLL per response token. A :class:`~nsr_megatron.trainer.actor.HeadLoss` (fused log-probs)."""
    from nsr_megatron.trainer import actor

    group = actor._tp_group()

    def fn(output: Any, batch: dict[str, torch.Tensor]) -> Any:
        lp, _ = actor._next_token_logprobs(output, batch["targets"], group=group, temperature=1.0)  # [B, T]
        mask = batch["mask"]  # [B, T] response targets
        nll = -(lp * mask).sum()
        loss = nll / global_tokens
        bad = ((~torch.isfinite(lp.detach())) & (mask > 0)).sum().double()
        return loss * scale, {"loss_sum": loss.detach().double(), "nonfinite_sum": bad}

    return actor.HeadLoss(fn)


def _vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """[B, T, V/tp] -> [B, T] global argmax ids (the lowest id among equal maxima, as ``argmax`` of the whole)."""
    from megatron.core import parallel_state as mpu

    value, index = logits.max(dim=-1)  # [B, T] each
    tp = mpu.get_tensor_model_parallel_world_size()
    if tp == 1:
        return index
    group = mpu.get_tensor_model_parallel_group()
    index = index + mpu.get_tensor_model_parallel_rank() * logits.shape[-1]
    values = [torch.empty_like(value) for _ in range(tp)]
    indices = [torch.empty_like(index) for _ in range(tp)]
    dist.all_gather(values, value.contiguous(), group=group)
    dist.all_gather(indices, index.contiguous(), group=group)
    best = torch.stack(values).argmax(dim=0)  # [B, T] first rank holding the maximum
    return torch.stack(indices).gather(0, best[None]).squeeze(0)


def evaluate_sft(bundle: Any, examples: list[SFTExample], *, max_tokens: int, pad_id: int, seq_multiple: int,
                 dp_rank: int, dp_size: int) -> dict[str, float]:
    """Held-out mean NLL per response token, teacher-forced token accuracy and exact match (every response token
    the argmax), over all ranks' shares of ``examples``; the same dict on every rank."""
    from nsr_megatron.losses import vocab_parallel_logprobs_entropy
    from nsr_megatron.trainer import actor

    group = actor._tp_group()
    mine = dp_shard(_samples(examples), dp_rank, dp_size)
    micro = _pack(mine, max_tokens=max_tokens, pad_id=pad_id, seq_multiple=seq_multiple)

    def stats(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = logits[:, :-1].float()  # [B, T, V/tp]
        targets, mask = batch["targets"].to(logits.device), batch["mask"].to(logits.device)  # [B, T]
        lp, _ = vocab_parallel_logprobs_entropy(logits, targets, group=group)  # [B, T]
        right = (_vocab_parallel_argmax(logits) == targets).float() * mask  # [B, T]
        real = mask.sum(1) > 0  # [B] examples (not rows of padding)
        exact = ((right.sum(1) == mask.sum(1)) & real).float()  # [B]
        return torch.stack([-(lp * mask).sum(), right.sum(), mask.sum(), exact.sum(),
                            real.sum().to(mask.dtype)]).double().cpu()

    sums = torch.zeros(5, dtype=torch.float64)
    if micro:
        was_fused = bundle.fused_logprobs
        bundle.fused_logprobs = False  # accuracy needs the logits (the argmax); held-out batches are small
        try:
            out = actor._forward_only(bundle, micro, stats)
        finally:
            bundle.fused_logprobs = was_fused
        from megatron.core import parallel_state as mpu

        if out is not None and mpu.get_tensor_model_parallel_rank() == 0:
            sums = torch.stack(out).sum(0)
    total = actor.reduce_stats([{"nll": sums[0], "right": sums[1], "tokens": sums[2], "exact": sums[3],
                                 "rows": sums[4]}])
    tokens, rows = max(total.get("tokens", 0.0), 1.0), max(total.get("rows", 0.0), 1.0)
    return {"eval/loss": total.get("nll", 0.0) / tokens, "eval/token_accuracy": total.get("right", 0.0) / tokens,
            "eval/exact_match": total.get("exact", 0.0) / rows, "eval/examples": total.get("rows", 0.0)}


def sft(config: SFTRunConfig, *, world_size: int = 1, progress: bool | None = None) -> dict[str, Any]:
    """Check every input, then run ``run.steps`` SFT steps (resuming with ``checkpoint.resume=auto``), logging
    ``metrics.jsonl`` and checkpointing. Returns ``{"run_dir", "rank", "last": the last step's metrics}``."""
    from nsr_megatron import parallel
    from nsr_megatron.convert.sharded import load_hf_sharded
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.telemetry import MetricsWriter, ProgressBar
    from nsr_megatron.trainer import actor
    from nsr_megatron.trainer.checkpoint import load_checkpoint, read_meta, save_checkpoint
    from nsr_megatron.trainer.runtime import _write_resolved_config, lr_at

    inputs = sft_preflight(config, world_size=world_size)
    run, s, ckpt = config.run, config.sft, config.checkpoint
    run_dir = Path(run.run_dir)
    state = parallel.initialize(config.parallel, seed=run.seed)
    if state.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_resolved_config(config, run_dir)  # type: ignore[arg-type]
    policy = build_model(inputs.arch, model=config.model, parallel=config.parallel, role="policy",
                         optimizer=config.optimizer)
    sampler = EpochSampler(len(inputs.train), s.batch_size, seed=run.seed + config.data.seed,
                           shuffle=config.data.shuffle)
    start = 0
    if inputs.resume_from is not None:
        saved = read_meta(inputs.resume_from)
        load_checkpoint(inputs.resume_from, policy.module, policy.optimizer if saved["has_optimizer"] else None)
        start = int(saved["meta"]["step"])
        sampler.load_state_dict(saved["meta"]["sampler"])
        log.info("sft: resumed from %s (step %d)", inputs.resume_from, start)
    elif ckpt.load:
        load_checkpoint(ckpt.load, policy.module)
    else:
        load_hf_sharded(policy.module, inputs.arch, config.model.hf_path)
    if dist.is_initialized():
        dist.barrier()
    pad_id = inputs.tokenizer.pad_token_id if inputs.tokenizer.pad_token_id is not None else (inputs.stop_id or 0)
    seq_multiple = config.parallel.tp if config.parallel.sequence_parallel else 1
    is_logger = state.rank == 0
    writer = MetricsWriter(run_dir, resume_step=start if inputs.resume_from is not None else None,
                           overwrite=inputs.resume_from is None, required_keys=()) if is_logger else None
    bar = ProgressBar(run.steps, initial_step=start, rank=state.rank, enabled=progress, log_every=10, desc="sft")
    evaluate = (lambda: evaluate_sft(policy, inputs.held_out, max_tokens=s.max_tokens_per_micro_batch,
                                     pad_id=pad_id, seq_multiple=seq_multiple, dp_rank=state.dp_rank,
                                     dp_size=state.dp_size)) if inputs.held_out else None
    metrics: dict[str, Any] = {}
    try:
        for step in range(start, run.steps):
            began = time.perf_counter()
            batch = [inputs.train[i] for i in sampler.next_batch()]
            global_tokens = float(sum(len(e.response_ids) for e in batch))
            mine = dp_shard(_samples(batch), state.dp_rank, state.dp_size)
            micro = _pack(mine, max_tokens=s.max_tokens_per_micro_batch, pad_id=pad_id, seq_multiple=seq_multiple)
            lr = lr_at(step, lr=config.optimizer.lr, min_lr=config.optimizer.min_lr,
                       warmup=config.optimizer.warmup_steps, total=run.steps, schedule=config.optimizer.lr_schedule)
            loss_fn = nll_loss_fn(global_tokens=global_tokens, scale=float(len(micro) * state.dp_size))
            sums, grad_norm = actor.train_step(policy, micro, loss_fn, lr=lr)
            reduced = actor.reduce_stats(sums)
            metrics = {"step": step + 1, "loss": reduced.get("loss_sum", float("nan")), "lr": lr,
                       "grad_norm": grad_norm, "sft/tokens": global_tokens, "sft/examples": float(len(batch)),
                       "sft/skipped": float(grad_norm is None), "sft/epoch": float(sampler.epoch)}
            if grad_norm is None:
                log.warning("sft step %d: a loss or gradient is NaN or inf; the update was skipped.", step + 1)
            if evaluate is not None and ((s.eval_interval and (step + 1) % s.eval_interval == 0)
                                         or step + 1 == run.steps):
                metrics.update(evaluate())
            metrics["timing/step"] = time.perf_counter() - began
            if writer is not None:
                writer.log(step + 1, metrics)
            bar.update(step + 1, metrics)
            if (ckpt.save_interval and (step + 1) % ckpt.save_interval == 0) or step + 1 == run.steps:
                save_checkpoint(run_dir / "checkpoints", step + 1, policy.module, policy.optimizer,
                                meta={"step": step + 1, "sampler": sampler.state_dict(), "stage": "sft"},
                                arch=dataclasses.asdict(inputs.arch), keep_last=ckpt.keep_last)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        parallel.destroy()
    if s.save_hf and is_logger:
        from nsr_megatron.convert import mcore_to_hf
        from nsr_megatron.trainer.checkpoint import latest_checkpoint

        last = latest_checkpoint(run_dir / "checkpoints")
        assert last is not None
        mcore_to_hf(last, run_dir / "hf", hf_config=Path(config.model.hf_path) / "config.json", overwrite=True,
                    progress=bool(progress))
        if config.model.tokenizer_path:  # the conversion copied model.hf_path's files; the tokenizer is elsewhere
            _copy_tokenizer(Path(config.model.tokenizer_path), run_dir / "hf")
    return {"run_dir": run_dir, "rank": state.rank, "last": metrics}


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer and generation files beside the exported weights, so the folder is a whole HF model."""
    from nsr_megatron.convert.io import copy_hf_side_files

    copy_hf_side_files(src, dst)
