"""GRPO group advantages and DAPO dynamic-sampling filters (pure torch).

Legend: N prompts (groups), G samples per prompt.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "informative_groups"]


def group_advantages(rewards: torch.Tensor, *, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A_ij = (R_ij - mean_j R_i.) / (std_j R_i. + eps); Dr.GRPO (``normalize_std=False``) skips the division.

    rewards: [N, G] -> advantages [N, G]. The std is the unbiased sample std over the group (as in GRPO
    implementations); a group of identical rewards gets all-zero advantages.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, samples_per_prompt], got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [N, G]
    if not normalize_std:
        return centred
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
    return centred / (std + eps)


def informative_groups(rewards: torch.Tensor, *, atol: float = 1e-8) -> torch.Tensor:
    """[N] bool: groups whose rewards are not all equal (DAPO dynamic sampling keeps only these)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > atol
