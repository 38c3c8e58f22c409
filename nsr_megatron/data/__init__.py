"""Prompt data: JSONL / Parquet datasets with chat templates, a resumable sampler, synthetic tasks and tokenizer.

The synthetic tasks live in ``nsr_megatron.data.synthetic`` and reasoning-gym's in ``nsr_megatron.data.reasoning_gym``
(not re-exported here, so that ``python -m`` runs them cleanly).
"""

from nsr_megatron.data.datasets import (
    DataConfig,
    EpochSampler,
    PromptDataset,
    PromptRecord,
    ReasoningGymConfig,
    get_key_path,
    render_prompt,
    to_messages,
)
from nsr_megatron.data.tokenizer import build_synthetic_tokenizer, save_synthetic_tokenizer

__all__ = [
    "DataConfig",
    "EpochSampler",
    "PromptDataset",
    "PromptRecord",
    "ReasoningGymConfig",
    "build_synthetic_tokenizer",
    "get_key_path",
    "render_prompt",
    "save_synthetic_tokenizer",
    "to_messages",
]
