"""Policy losses for RLVR (pure torch, no megatron): presets (NSR and its competitors), vocab-parallel log-probs
(from logits, or fused with the output layer from the last hidden states), reductions.

>>> from nsr_megatron.losses import PolicyLossConfig, policy_loss
>>> cfg = PolicyLossConfig(name="nsr", eps_low=0.2, eps_high=0.28)
>>> loss, sums = policy_loss(cfg, logprobs, old_logprobs, advantages, mask, sample_ids=ids, step=step)

See docs/LOSSES.md for the definitions, :mod:`nsr_megatron.losses.config` for the presets and knobs and
:mod:`nsr_megatron.losses.policy` for the maths.
"""

from nsr_megatron.losses.fused_logprobs import fused_logprobs_entropy
from nsr_megatron.losses.logprobs import vocab_parallel_logprobs_entropy
from nsr_megatron.losses.policy import (
    PRESETS,
    PolicyLossConfig,
    loss_denominators,
    policy_loss,
    rescue_probability,
)
from nsr_megatron.losses.reduce import global_statistics, global_sums, seq_sum_fn, summarize_metrics
from nsr_megatron.losses.rng import uniform

__all__ = [
    "PRESETS",
    "PolicyLossConfig",
    "fused_logprobs_entropy",
    "global_statistics",
    "global_sums",
    "loss_denominators",
    "policy_loss",
    "rescue_probability",
    "seq_sum_fn",
    "summarize_metrics",
    "uniform",
    "vocab_parallel_logprobs_entropy",
]
