"""Small builders shared by the tests: tiny HF model folders, prompt files, and the quickstart's own settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def project_server(hf_dir: Path, *, port: int) -> Iterator[str]:
    """A process of the project's rollout server on ``hf_dir`` at 127.0.0.1:``port``, healthy; yields its URL."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "nsr_megatron.rollout.server", "--model-path", str(hf_dir),
                             "--port", str(port)], cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise TimeoutError(f"{url} did not become healthy") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
