"""Prompt data: JSONL / Parquet datasets with chat templates, a resumable sampler, synthetic tasks and tokenizer.

The synthetic tasks live in ``nsr_megatron.data.synthetic`` (not re-exported here, so that
``python -m nsr_megatron.data.synthetic`` runs cleanly).
"""

from nsr_megatron.data.datasets import (
    DataConfig,
    EpochSampler,
    PromptDataset,
    PromptRecord,
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
    "build_synthetic_tokenizer",
    "get_key_path",
    "render_prompt",
    "save_synthetic_tokenizer",
    "to_messages",
]
