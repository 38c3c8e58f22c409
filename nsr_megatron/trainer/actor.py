"""The trainer's megatron boundary: forward / backward through megatron-core's pipeline schedule,
the optimizer step, and vocabulary gathering.

With ``model.fused_logprobs`` (``bundle.fused_logprobs``) the trainer's own losses (:func:`policy_loss_fn`,
:func:`token_logprobs`, both :class:`HeadLoss`) receive the output layer's input, a
:class:`~nsr_megatron.models.fused_head.HeadInput` (hidden states [B, S, H] and the output weight [V/tp, H]), and
compute the log-probs with :func:`~nsr_megatron.losses.fused_logprobs_entropy`: no [B, S, V/tp] logits tensor.
Any other loss function receives logits as before.

Legend: B micro-batch size, S sequence length, H hidden size, V vocabulary (V/tp on each tensor-parallel rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nsr_megatron.models.fused_head import HeadInput, hidden_head
from nsr_megatron.models.provider import ModelBundle, gather_vocab

__all__ = [
    "HeadLoss",
    "MicroBatch",
    "data_parallel_group",
    "forward_backward",
    "forward_logits",
    "gather_vocab",
    "optimizer_step",
    "reduce_stats",
    "train_step",
]

# A micro-batch: {"tokens": [B, S] int64, "position_ids": [B, S] int64 (optional), ...any extras}.
MicroBatch = dict[str, torch.Tensor]
LossResult = tuple[torch.Tensor, dict[str, torch.Tensor]]  # (loss scalar, {name: detached scalar tensor})
# loss_fn(logits [B, S, V/tp], micro_batch) -> LossResult
LossFn = Callable[[torch.Tensor, MicroBatch], LossResult]


@dataclass(frozen=True)
class HeadLoss:
    """A loss function that also takes the output layer's input: with ``bundle.fused_logprobs``,
    :func:`forward_backward` runs the model under :func:`~nsr_megatron.models.fused_head.hidden_head` and calls
    ``fn(HeadInput, micro_batch)``; otherwise ``fn(logits [B, S, V/tp], micro_batch)``. A plain :data:`LossFn`
    always gets logits."""

    fn: Callable[[torch.Tensor | HeadInput, MicroBatch], LossResult]

    def __call__(self, output: torch.Tensor | HeadInput, batch: MicroBatch) -> LossResult:
        return self.fn(output, batch)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _wire_config(bundle: ModelBundle) -> None:
    """Hook megatron's schedule to this model's DDP and optimizer (idempotent)."""
    from megatron.core.distributed import finalize_model_grads

    cfg = bundle.config
    if bundle.role == "policy":
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.no_sync_func = bundle.module.no_sync
        cfg.grad_scale_func = bundle.optimizer.scale_loss
    else:
        cfg.finalize_model_grads_func = None
        cfg.no_sync_func = None
        cfg.grad_scale_func = None


def forward_backward(
    bundle: ModelBundle,
    micro_batches: list[MicroBatch],
    loss_fn: LossFn,
    *,
    forward_only: bool = False,
    phase: str = "train",
) -> list[dict[str, torch.Tensor]]:
    """Run every micro-batch through megatron-core's ``forward_backward_func`` (any PP size).

    ``phase`` names the pass for the model's routing profiler, when it has one (``old`` or ``train``).
    A :class:`HeadLoss` gets the output layer's input instead of logits when ``bundle.fused_logprobs``.

    Returns the metrics dicts that ``loss_fn`` produced, on the last pipeline stage (empty elsewhere).
    The schedule divides each micro-batch loss by ``len(micro_batches)`` and megatron DDP averages
    gradients over data-parallel ranks; callers that normalise by global denominators scale back.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    _wire_config(bundle)
    device = _device()
    seq_len = int(micro_batches[0]["tokens"].shape[1])
    mbs = int(micro_batches[0]["tokens"].shape[0])
    head_loss = loss_fn if bundle.fused_logprobs and isinstance(loss_fn, HeadLoss) else None

    def forward_step(data_iterator: Iterable[MicroBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}  # type: ignore[call-overload]
        tokens = batch["tokens"]  # [B, S]
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        with contextlib.ExitStack() as routing:  # replay sets the routers' choices; the profiler then sees them
            for hook in (bundle.replay, bundle.routing):
                if hook is not None and "mb_key" in batch:
                    routing.enter_context(hook.micro_batch(int(batch["mb_key"]), phase, batch))
            head = routing.enter_context(hidden_head(bundle.gpt)) if head_loss is not None else None
            output = model(tokens, position_ids, None)  # last stage: [B, S, V/tp] logits, or [B, S, H] when fused

        def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if head_loss is not None and head is not None:
                loss, metrics = head_loss(head.input(output_tensor), batch)
            else:
                loss, metrics = loss_fn(output_tensor, batch)
            # The schedule divides the loss in place; metrics must not share its storage.
            return loss, {k: v.detach().clone() for k, v in metrics.items()}

        return output, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[bundle.module],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def optimizer_step(bundle: ModelBundle, *, lr: float | None = None) -> float:
    """Apply the accumulated gradients (clipped by megatron's optimizer); returns the gradient norm."""
    opt = bundle.optimizer
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    _, grad_norm, _ = opt.step()
    return float(grad_norm) if grad_norm is not None else 0.0


def _local_nonfinite_grads(bundle: ModelBundle) -> bool:
    """Whether any gradient in this rank's DDP buffers is NaN or inf (all of them, not only the shard this
    rank's distributed optimizer owns: a bad contribution anywhere poisons the reduced value).

    One sum per buffer: a NaN or inf anywhere makes the sum NaN or inf (so does a sum of finite gradients past
    3.4e38, which is as unusable). 30x cheaper on CPU than ``isfinite(grad).all()``, a pass that made 4% of a
    small model's training step."""
    ddp = bundle.module
    buffers = list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", []))
    if buffers:
        return any(not bool(torch.isfinite(b.grad_data.sum(dtype=torch.float32))) for b in buffers)
    return any(p.grad is not None and not bool(torch.isfinite(p.grad.sum(dtype=torch.float32)))
               for p in ddp.parameters())


def train_step(
    bundle: ModelBundle, micro_batches: list[MicroBatch], loss_fn: LossFn, *, lr: float
) -> tuple[list[dict[str, torch.Tensor]], float | None]:
    """One optimizer step over ``micro_batches``: forward, backward, then the update, unless anything is
    non-finite. Returns ``(loss_fn metrics per micro-batch, gradient norm)``; the norm is ``None`` when the
    step was skipped.

    The step is skipped on every rank (a collective decision) when a loss, a log-prob counted by
    ``loss_fn`` (its ``nonfinite_sum`` metric) or a gradient anywhere is NaN or inf: the weights and the
    optimizer state are left exactly as they were and the gradients are cleared.
    """
    zero_grads(bundle)
    sums = forward_backward(bundle, micro_batches, loss_fn)
    bad = any(not bool(torch.isfinite(d["loss_sum"])) or float(d.get("nonfinite_sum", 0.0)) > 0
              for d in sums if "loss_sum" in d)
    flag = torch.tensor([float(bad or _local_nonfinite_grads(bundle))], device=_device())  # NCCL needs CUDA
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        zero_grads(bundle)
        return sums, None
    return sums, optimizer_step(bundle, lr=lr)


def zero_grads(bundle: ModelBundle) -> None:
    bundle.module.zero_grad_buffer()
    bundle.optimizer.zero_grad()


def _forward_only(
    bundle: ModelBundle,
    micro_batches: list[MicroBatch],
    per_batch: Callable[[Any, MicroBatch], torch.Tensor],
    *,
    head: bool = False,
) -> list[torch.Tensor] | None:
    """``per_batch(output, micro_batch)`` for every micro-batch, in eval mode without gradients; the results
    on the last pipeline stage, None elsewhere. ``output`` is the logits, or with ``head`` (and
    ``bundle.fused_logprobs``) the output layer's :class:`HeadInput`."""
    from megatron.core import parallel_state as mpu

    captured: list[torch.Tensor] = []

    def capture(output: torch.Tensor | HeadInput, batch: MicroBatch) -> LossResult:
        captured.append(per_batch(output, batch))
        return (output.hidden if isinstance(output, HeadInput) else output).sum() * 0.0, {}

    was_training = bundle.module.training
    bundle.module.eval()
    try:
        with torch.no_grad():
            forward_backward(bundle, micro_batches, HeadLoss(capture) if head else capture, forward_only=True,
                             phase="old")
    finally:
        bundle.module.train(was_training)
    return captured if mpu.is_pipeline_last_stage() else None


def forward_logits(bundle: ModelBundle, micro_batches: list[MicroBatch]) -> list[torch.Tensor] | None:
    """Full-vocabulary logits [B, S, V] (fp32) per micro-batch on the last pipeline stage, else None."""
    return _forward_only(bundle, micro_batches, lambda logits, _: gather_vocab(logits.float()))


def _tp_group() -> Any:
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_group() if mpu.get_tensor_model_parallel_world_size() > 1 else None


def _next_token_logprobs(
    output: torch.Tensor | HeadInput, targets: torch.Tensor, *, group: Any, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob, entropy) [B, T = S - 1] of the next tokens ``targets`` [B, T], from logits [B, S, V/tp] or
    from the output layer's input (the fused op: no logits tensor)."""
    from nsr_megatron.losses import fused_logprobs_entropy, vocab_parallel_logprobs_entropy

    if isinstance(output, HeadInput):
        # megatron DDP (overlap_grad_reduce off) accumulates in main_grad: the weight's gradient goes there
        # directly, slice by slice, and no [V/tp, H] gradient tensor is made
        weight = output.weight
        main_grad = getattr(weight, "main_grad", None) if weight.requires_grad and torch.is_grad_enabled() else None
        return fused_logprobs_entropy(output.hidden[:, :-1], weight, targets, group=group,
                                      temperature=temperature, main_grad=main_grad)
    return vocab_parallel_logprobs_entropy(output[:, :-1], targets, group=group, temperature=temperature)


def token_logprobs(bundle: ModelBundle, micro_batches: list[MicroBatch], *, temperature: float) -> list[torch.Tensor] | None:
    """log softmax(logits / T)[target] per micro-batch, [B, T] fp32, on the last pipeline stage (else None).

    Used for the old policy's log-probs (recomputed by the trainer) and the reference model's. With
    ``bundle.fused_logprobs`` they come from the hidden states (no logits tensor).
    """
    group = _tp_group()

    def logprobs(output: torch.Tensor | HeadInput, batch: MicroBatch) -> torch.Tensor:
        lp, _ = _next_token_logprobs(output, batch["targets"], group=group, temperature=temperature)
        return lp.float().cpu()

    return _forward_only(bundle, micro_batches, logprobs, head=True)


def policy_loss_fn(
    loss_cfg: Any,
    *,
    step: int,
    temperature: float,
    global_num_tokens: torch.Tensor,
    global_num_seqs: torch.Tensor,
    scale: float,
    masks_out: dict[int, dict[str, torch.Tensor]] | None = None,
    old_from_current: bool = False,
) -> HeadLoss:
    """The RL loss on one micro-batch, normalised by the step's global denominators.

    megatron's schedule divides each micro-batch loss by the number of micro-batches and DDP averages
    gradients over data-parallel ranks; ``scale`` (= micro-batches x data-parallel size) undoes both, so
    the gradient is exactly that of the global loss (docs/LOSSES.md, "Aggregation and normalisation").
    With ``masks_out``, each micro-batch's per-token band / clipped / rescued masks are stored there under its
    ``mb_key`` (for the routing profiler). With ``old_from_current`` the old log-probs are this forward's own,
    detached (the on-policy shortcut: one optimizer step on a batch from the current weights).
    A :class:`HeadLoss`: with ``bundle.fused_logprobs`` it takes the hidden states, not logits.
    """
    from nsr_megatron.losses import policy_loss

    group = _tp_group()

    def fn(output: torch.Tensor | HeadInput, batch: MicroBatch) -> LossResult:
        masks: dict[str, torch.Tensor] | None = {} if masks_out is not None else None
        lp, entropy = _next_token_logprobs(output, batch["targets"], group=group, temperature=temperature)  # [B, T]
        old = lp.detach() if old_from_current else batch["old_logprobs"]
        loss, sums = policy_loss(
            loss_cfg,
            lp,
            old,
            batch["advantages"],
            batch["mask"],
            sample_ids=batch["sample_ids"],
            step=step,
            token_index=batch["token_index"],
            global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs,
            ref_logprobs=batch.get("ref_logprobs"),
            rollout_logprobs=batch.get("rollout_logprobs"),
            entropy=entropy.detach(),
            masks=masks,
        )
        if masks_out is not None and masks is not None:
            masks_out[int(batch["mb_key"])] = {k: v.cpu() for k, v in masks.items()}
        # Masked tokens whose log-probs (current, old, reference or rollout) are NaN / inf: train_step skips.
        nonfinite = torch.zeros(lp.shape, dtype=torch.bool, device=lp.device)
        for x in (lp.detach(), old, batch.get("ref_logprobs"), batch.get("rollout_logprobs")):
            if x is not None:
                nonfinite |= ~torch.isfinite(x)
        bad = (nonfinite & (batch["mask"] > 0)).sum().double()
        return loss * scale, {**sums, "loss_sum": loss.detach().double(), "nonfinite_sum": bad}

    return HeadLoss(fn)


def data_parallel_group() -> Any:
    """The data-parallel process group (the loss's denominators are summed over it)."""
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_group()


def reduce_stats(per_micro: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum the loss statistics over micro-batches and all ranks; every rank gets the result.

    Only last-pipeline-stage, tensor-rank-0 processes contribute (the loss runs there, identically on each TP
    rank), so nothing is counted twice.
    """
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


def from_last_stage(obj: Any) -> Any:
    """``obj`` of the last pipeline stage on every stage of this rank's pipeline group (as is without PP)."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return obj
    group = mpu.get_pipeline_model_parallel_group()
    box = [obj if mpu.is_pipeline_last_stage() else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, mpu.get_pipeline_model_parallel_world_size() - 1),
                               group=group)
    return box[0]
