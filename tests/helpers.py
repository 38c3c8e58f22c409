"""Small builders shared by the tests: tiny HF model folders, prompt files, and the quickstart's own settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from nsr_megatron.cli import CONFIGS_DIR


def quickstart_tiny() -> dict[str, Any]:
    """The ``model.tiny`` overrides of the shipped quickstart config (the model every e2e test trains)."""
    with open(CONFIGS_DIR / "quickstart.yaml", encoding="utf-8") as f:
        return dict(yaml.safe_load(f)["model"]["tiny"])


def make_tiny_model(path: Path, *, seed: int = 1, tokenizer: bool = True, **overrides: Any) -> Path:
    """A real HF checkpoint folder (config.json + safetensors) of the quickstart's tiny model, with the
    synthetic tokenizer unless ``tokenizer=False``; ``overrides`` change its config.json."""
    from nsr_megatron.data.tokenizer import save_synthetic_tokenizer
    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

    create_tiny_hf_checkpoint(path, seed=seed, **{**quickstart_tiny(), **overrides})
    if tokenizer:
        save_synthetic_tokenizer(path)
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line (strings are written as they are, to make malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def echo_rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{i % 10}=", "answer": str(i % 10)} for i in range(n)]
