"""The output layer's input instead of its logits: for one forward, megatron's GPTModel returns the last hidden
states, and the weight the logits would have used is kept, so that
:func:`nsr_megatron.losses.fused_logprobs_entropy` makes log-probs without a [tokens, V/tp] logits tensor.

Legend: S sequence, B micro-batch rows, H hidden size, V vocabulary (V/tp rows of the output weight on each
tensor-parallel rank), tp the tensor-parallel size.

The hook (megatron-core 0.16). ``GPTModel._postprocess`` calls ``self.output_layer(hidden_states,
weight=output_weight, runtime_gather_output=...)``, a ``tensor_parallel.ColumnParallelLinear`` whose ``forward``
wraps the input in ``copy_to_tensor_model_parallel_region`` unless its own linear does the communication, then
calls ``self._forward_impl(input=, weight=, bias=, allreduce_dgrad=, sequence_parallel=, tp_group=, ...)``
(``linear_with_grad_accumulation_and_async_allreduce``), and ``_postprocess`` returns
``logits.transpose(0, 1).contiguous()``. Inside :func:`hidden_head` the layer instance's ``_forward_impl`` is
replaced by :func:`_head_input`, which keeps the linear's input communication and drops its GEMM:

- sequence parallelism: the input [S/tp, B, H] is all-gathered along the sequence and the gradient
  reduce-scattered back (``gather_from_sequence_parallel_region``), as the linear does inside;
- tensor parallelism without it (``allreduce_dgrad``): identity forward, all-reduce of the input gradient
  backward, as the linear does inside (:class:`_SumGradOverGroup`, not megatron's
  ``copy_to_tensor_model_parallel_region``: its backward all-reduces ``grad.contiguous()`` and returns ``grad``,
  so it silently skips the sum when the gradient is not contiguous, and ours comes back through
  ``_postprocess``'s transpose; megatron's linear never hits that, its input gradient is a fresh GEMM output);
- otherwise the layer's ``forward`` already applied the copy (or tp = 1): the input as it is.

It returns the hidden states [S, B, H] of the whole sequence (the same on every tensor-parallel rank), so the
model returns [B, S, H], and records the weight it was given ([V/tp, H]; the shared embedding weight with tied
embeddings). The gradient the fused op returns for the hidden states is this rank's partial sum over its
vocabulary slice; the all-reduce / reduce-scatter above sums it over the group, exactly where the linear's
backward summed its own.

The weight's gradient goes straight into megatron DDP's ``main_grad`` (the trainer passes it to the fused op,
which adds it slice by slice and returns none): what DDP's hook would have added, without a [V/tp, H] gradient
tensor. That is safe because the project runs DDP with ``overlap_grad_reduce=False`` (no bucket waits for the
hook) and the flag ``grad_added_to_main_grad`` is left as ``zero_grad_buffer`` set it (False): with tied
embeddings the embedding's own ``.grad`` still takes the hook's path into the same ``main_grad``.
``gradient_accumulation_fusion`` (megatron's fused wgrad into ``main_grad``) plays no part: the linear does not
run here, and :func:`~nsr_megatron.models.hf_config.transformer_config` turns it off anyway (it needs apex's
CUDA extension). Without ``main_grad`` (no DDP wrapper) the weight's gradient is an ordinary autograd ``.grad``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["HeadCapture", "HeadInput", "hidden_head"]


@dataclass(frozen=True)
class HeadInput:
    """What the output layer would have multiplied: logits [B, S, V/tp] = ``hidden @ weight.T``."""

    hidden: Tensor  # [B, S, H] the last hidden states (after the final norm), whole sequence
    weight: Tensor  # [V/tp, H] this rank's rows of the output weight (the embedding's when tied)


@dataclass
class HeadCapture:
    """Filled during the forward: the weight the output layer was given (None on other pipeline stages)."""

    weight: Tensor | None = None

    def input(self, hidden: Tensor) -> HeadInput:
        """The model's output [B, S, H] of this forward, with the weight."""
        if self.weight is None:
            raise RuntimeError(
                "the output layer did not run in this forward (not the last pipeline stage?); the hidden "
                "states and the output weight exist only where the model computes logits."
            )
        return HeadInput(hidden=hidden, weight=self.weight)


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward: the gradient summed over ``group`` (into a fresh contiguous tensor)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        total = torch.empty_like(grad, memory_format=torch.contiguous_format).copy_(grad)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _head_input(
    capture: HeadCapture,
    input: Tensor,  # [S or S/tp, B, H]
    weight: Tensor,  # [V/tp, H]
    bias: Tensor | None = None,
    *,
    allreduce_dgrad: bool = False,
    sequence_parallel: bool = False,
    tp_group: Any = None,
    **_: Any,
) -> Tensor:
    """The linear's input communication without its GEMM: hidden states [S, B, H]."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    if bias is not None:
        raise ValueError("the output layer has a bias; the fused log-probs take hidden @ weight.T only.")
    if capture.weight is not None:
        raise RuntimeError("the output layer ran twice in one forward (multi-token prediction?); "
                           "set model.fused_logprobs=false for this model.")
    capture.weight = weight
    if sequence_parallel:
        return gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
    if allreduce_dgrad:
        return _SumGradOverGroup.apply(input, tp_group)  # type: ignore[no-untyped-call,no-any-return,unused-ignore]
    return input


@contextmanager
def hidden_head(gpt: Any) -> Iterator[HeadCapture]:
    """For the block, ``gpt(...)`` returns the last hidden states [B, S, H] instead of logits [B, S, V/tp];
    the yielded :class:`HeadCapture` receives the output weight. ``gpt`` is the bare GPTModel (unwrapped from
    DDP). On a pipeline stage without the output layer, nothing changes."""
    from functools import partial

    capture = HeadCapture()
    layer = getattr(gpt, "output_layer", None) if getattr(gpt, "post_process", False) else None
    if layer is None:
        yield capture
        return
    config = gpt.config
    for setting, value, why in (
        ("gather_output", layer.gather_output, "the logits would be gathered over the vocabulary"),
        ("config.defer_embedding_wgrad_compute", config.defer_embedding_wgrad_compute,
         "the output weight's gradient would be computed later from buffers the linear fills"),
        ("config.mtp_num_layers", config.mtp_num_layers, "the output layer runs once per prediction depth"),
    ):
        if value:
            raise ValueError(f"{setting}={value!r}: {why}; set model.fused_logprobs=false for this model.")
    saved = layer.__dict__.get("_forward_impl")
    layer._forward_impl = partial(_head_input, capture)
    try:
        yield capture
    finally:
        if saved is None:
            del layer._forward_impl
        else:
            layer._forward_impl = saved
