"""Tiny Hugging Face configs for smoke runs, quick starts and tests (written as real config.json files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["create_tiny_hf_checkpoint", "tiny_moe_config", "write_tiny_hf_config"]


def tiny_moe_config(**overrides: Any) -> dict[str, Any]:
    """A Qwen3-MoE ``config.json`` dict of about 8M parameters (4 layers, 8 experts, top-2)."""
    cfg: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 256,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def write_tiny_hf_config(directory: str | os.PathLike[str], **overrides: Any) -> Path:
    """Write ``tiny_moe_config(**overrides)`` as ``<directory>/config.json``; return the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w", encoding="utf-8") as f:
        json.dump(tiny_moe_config(**overrides), f, indent=2)
    return path


def create_tiny_hf_checkpoint(directory: str | os.PathLike[str], *, seed: int = 0, **overrides: Any) -> Path:
    """Save a randomly initialised Qwen3-MoE (``tiny_moe_config(**overrides)``) with ``save_pretrained``:
    a real Hugging Face checkpoint directory (config.json + safetensors) that a run starts from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = write_tiny_hf_config(directory, **overrides)
    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path
