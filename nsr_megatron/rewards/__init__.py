"""Verifiable rewards: math answer checking, exact match, synthetic tasks, reasoning-gym tasks (``reasoning_gym``),
user rewards by import path.

``RewardScorer(RewardConfig(...)).score_batch(responses, answers, response_lengths)`` runs each call in a
time-limited worker; failures and time-outs score 0 and are counted in ``RewardStats``.
"""

from nsr_megatron.rewards.builtin import (
    BUILTIN_REWARDS,
    RewardFn,
    exact_match,
    extract_boxed,
    math_reward,
    math_verify_available,
    normalize_math_string,
    normalize_whitespace,
    synthetic_reward,
)
from nsr_megatron.rewards.scorer import (
    RewardConfig,
    RewardScorer,
    RewardStats,
    overlong_penalty,
    resolve_reward_fn,
    score_batch,
)

__all__ = [
    "BUILTIN_REWARDS",
    "RewardConfig",
    "RewardFn",
    "RewardScorer",
    "RewardStats",
    "exact_match",
    "extract_boxed",
    "math_reward",
    "math_verify_available",
    "normalize_math_string",
    "normalize_whitespace",
    "overlong_penalty",
    "resolve_reward_fn",
    "score_batch",
    "synthetic_reward",
]
